"""What ``usseg segment`` reports over its images: the table of class areas, a sample grid of overlays and
the index page (docs/own-images.md). Pure functions; the task decides where files go.

Classes are the clusters of the model, named by ``names.yaml`` (``usseg_core.gallery.read_names``) where
a person named them, else ``cluster_<id>``.
"""
from __future__ import annotations

import html
from collections.abc import Iterable, Sequence

import numpy as np

from usseg_core.gallery import cluster_name

AREA_COLUMNS = ("image_id", "class_id", "class_name", "pixels", "fraction")
SAMPLE = 24        # overlays in the index page's sample grid
TILE_SIDE = 240    # long side of a tile of the sample grid, in pixels


def area_rows(pixels: Iterable[dict], *, names: dict[int, str]) -> list[dict]:
    """One row per (image, class present): ``AREA_COLUMNS``; ``fraction`` is of the image's pixels, so
    an image's fractions sum to 1 and its pixels to its area.

    ``pixels``: ``{"image_id", "class_id", "pixels", "height", "width"}`` per image and class present."""
    return [{"image_id": r["image_id"], "class_id": int(r["class_id"]),
             "class_name": cluster_name(names, int(r["class_id"])), "pixels": int(r["pixels"]),
             "fraction": int(r["pixels"]) / (int(r["height"]) * int(r["width"]))} for r in pixels]


def sample_ids(ids: Sequence[str], n: int = SAMPLE) -> list[str]:
    """At most ``n`` ids spread evenly over ``ids`` (all of them when there are no more)."""
    if len(ids) <= n:
        return list(ids)
    return [ids[int(i)] for i in np.linspace(0, len(ids) - 1, n).round()]


def sample_grid(tiles: Sequence[tuple[str, np.ndarray]], *, columns: int = 4, side: int = TILE_SIDE) -> np.ndarray:
    """The overlays ``(id, (H, W, 3) uint8)`` as one picture, ``columns`` a row, each scaled to fit a tile
    ``side`` wide and 3/4 of it high, captioned with its id: (rows * (3/4 side + 18), columns * side, 3)."""
    from PIL import Image, ImageDraw

    rows, tile_h = max(1, -(-len(tiles) // columns)), side * 3 // 4
    cell_h = tile_h + 18
    canvas = Image.new("RGB", (min(columns, max(1, len(tiles))) * side, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (image_id, pic) in enumerate(tiles):
        scale = min((side - 4) / pic.shape[1], (tile_h - 4) / pic.shape[0])
        size = (max(1, round(pic.shape[1] * scale)), max(1, round(pic.shape[0] * scale)))
        img = Image.fromarray(pic).resize(size, Image.BILINEAR)
        x, y = (k % columns) * side, (k // columns) * cell_h
        canvas.paste(img, (x + (side - img.width) // 2, y + (tile_h - img.height) // 2))
        draw.text((x + 4, y + tile_h + 2), image_id[:38], fill="black")
    return np.asarray(canvas)


def index_html(title: str, note: str, *, ids: Sequence[str], stems: Sequence[str], areas: Sequence[dict],
               legend: Sequence[dict], grid_src: str, base: str) -> str:
    """The index page: the legend (every cluster's colour and name, its share of all pixels), the sample
    grid, and one row per image with links to its pictures (``base`` + ``<stem>_overlay.png`` ...) and its
    classes by area.

    ``legend``: ``{"id", "name", "colour" (r, g, b), "fraction"}``; ``areas``: rows of :func:`area_rows`."""
    from usseg_core.report import html_page

    by_image: dict[str, list[dict]] = {}
    for r in areas:
        by_image.setdefault(r["image_id"], []).append(r)
    swatch = "<span class='swatch' style='background:#%02x%02x%02x'></span>"
    legend_rows = "".join(
        f"<tr><td>{swatch % tuple(int(v) for v in c['colour'])} {c['id']}</td><td>{html.escape(c['name'])}</td>"
        f"<td>{100 * c['fraction']:.1f} %</td></tr>" for c in legend)
    legend_html = (f"<table><thead><tr><th>cluster</th><th>name</th><th>share of all pixels</th></tr></thead>"
                   f"<tbody>{legend_rows}</tbody></table>")
    image_rows = []
    for image_id, stem in zip(ids, stems):
        links = " ".join(f"<a href='{html.escape(base + stem)}_{kind}.png'>{kind}</a>"
                         for kind in ("overlay", "color", "labels"))
        classes = ", ".join(f"{html.escape(r['class_name'])} {100 * r['fraction']:.0f} %"
                            for r in sorted(by_image.get(image_id, []), key=lambda r: -r["pixels"]))
        image_rows.append(f"<tr><td>{html.escape(image_id)}</td><td>{links}</td><td>{classes}</td></tr>")
    table = (f"<table class='images'><thead><tr><th>image</th><th>pictures</th><th>classes by area</th></tr>"
             f"</thead><tbody>{''.join(image_rows)}</tbody></table>")
    style = "<style>.swatch{display:inline-block;width:1em;height:1em;vertical-align:middle}</style>"
    return html_page(title, [("Legend", style + f"<p class='note'>{html.escape(note)}</p>" + legend_html),
                             ("Sample", f"<img src='{html.escape(grid_src)}' alt='sample of overlays'>"),
                             (f"Every image ({len(ids)})", table)])
