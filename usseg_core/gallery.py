"""The cluster gallery: for each cluster, the image patches whose codes lie closest to it, so that a person
can name the clusters (docs/own-images.md), and the names file they write back.

Pure functions, no paths decided here: which feature cells are nearest each cluster (:func:`nearest_cells`,
streamed over score maps), where a cell lies in its original image (:func:`cell_box`), the patch around it
(:func:`patch`), the grid PNG (:func:`gallery_grid`), the page (:func:`gallery_html`), and the names file
(:func:`read_names`, :func:`check_names`, :func:`names_template`).

"Closest" is the predictor's own score (the logits of STEGO's cluster probe, PiCIE's centroids, or
k-means: higher = closer), among the cells the predictor assigns to the cluster. A row prefers distinct
images: each image offers its best cell of the cluster, the ``per_cluster`` best images make the row, and
only a cluster found in fewer images takes second cells of the same image.
"""
from __future__ import annotations

import heapq
import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from usseg_core.crops import center_crop_box, short_side_resize_size
from usseg_core.errors import InputError

PER_CLUSTER = 8   # patches per cluster: one row of the grid
PATCH_SIDE = 96   # pixels of a patch in the grid and on the page
CONTEXT = 4       # a patch shows CONTEXT x CONTEXT cells around its cell, which is outlined
GAP = 4           # pixels between patches of the grid


@dataclass(frozen=True, order=True)
class Cell:
    """One feature cell: its score for ``cluster`` (first, so cells sort by it), the item and grid position."""

    score: float
    cluster: int
    item: int
    y: int
    x: int


class _Best:
    """The ``n`` highest-scoring entries seen (a min-heap)."""

    def __init__(self, n: int) -> None:
        self.n, self.heap = n, []

    def add(self, cell: Cell) -> None:
        if len(self.heap) < self.n:
            heapq.heappush(self.heap, cell)
        elif cell > self.heap[0]:
            heapq.heapreplace(self.heap, cell)

    def sorted(self) -> list[Cell]:
        return sorted(self.heap, reverse=True)


def nearest_cells(score_maps: Iterable[tuple[int, np.ndarray]], *, n_clusters: int,
                  per_cluster: int = PER_CLUSTER) -> list[list[Cell]]:
    """Per cluster, the cells nearest it (best first): at most ``per_cluster``, distinct images first.

    Args:
        score_maps: ``(first item, scores)`` batches; ``scores`` (B, K, h, w), higher = closer, for items
            ``first .. first + B - 1``. A cell counts for the cluster of its highest score.
        n_clusters: K.
        per_cluster: cells per cluster.

    Returns:
        ``K`` lists of :class:`Cell` (empty for a cluster no cell is assigned to).
    """
    by_image = [_Best(per_cluster) for _ in range(n_clusters)]  # each image's best cell of the cluster
    overall = [_Best(per_cluster) for _ in range(n_clusters)]   # the best cells, whatever their image
    for first, scores in score_maps:
        scores = np.asarray(scores, dtype=np.float32)  # (B, K, h, w)
        b, k, h, w = scores.shape
        if k != n_clusters:
            raise ValueError(f"scores have {k} clusters, expected {n_clusters}")
        assign = scores.argmax(1)  # (B, h, w)
        for c in np.unique(assign):
            mine = np.where(assign == c, scores[:, c], -np.inf).reshape(b, h * w)  # (B, h*w)
            for i in np.flatnonzero(np.isfinite(mine).any(1)):
                order = np.argsort(-mine[i])[:per_cluster]
                cells = [Cell(float(mine[i, j]), int(c), first + int(i), int(j) // w, int(j) % w)
                         for j in order if np.isfinite(mine[i, j])]
                by_image[c].add(cells[0])
                for cell in cells:
                    overall[c].add(cell)
    out = []
    for c in range(n_clusters):
        row = by_image[c].sorted()
        taken = set(row)
        row += [cell for cell in overall[c].sorted() if cell not in taken][: per_cluster - len(row)]
        out.append(row)
    return out


def cell_box(view: dict, image_hw: tuple[int, int], grid_hw: tuple[int, int], y: int, x: int
             ) -> tuple[float, float, float, float]:
    """``(top, left, height, width)`` in pixels of the original image covered by feature cell ``(y, x)``.

    ``view`` is a feature view's parameters (``ViewSpec.params()``): ``full`` (the whole frame resized) or
    ``center_crop`` (short side resized, central square cut: ``usseg_core.views.prepare_item``); a
    five-crop view has five boxes per image and is refused.
    """
    height, width = image_hw
    gh, gw = grid_hw
    if view.get("flip"):
        x = gw - 1 - x
    if view["policy"] == "full":
        sy, sx = height / gh, width / gw
        return y * sy, x * sx, sy, sx
    if view["policy"] != "center_crop":
        raise ValueError(f"cell_box: a {view['policy']!r} view has several boxes per image")
    res = int(view["resolution"])
    nh, nw = short_side_resize_size(height, width, res)
    top, left, ch, cw = center_crop_box(nh, nw, res)
    cy, cx = ch / gh, cw / gw
    ry, rx = height / nh, width / nw
    return (top + y * cy) * ry, (left + x * cx) * rx, cy * ry, cx * rx


def patch(image: np.ndarray, box: tuple[float, float, float, float], colour: Sequence[int], *,
          side: int = PATCH_SIDE, context: int = CONTEXT) -> np.ndarray:
    """The square around ``box`` (``context`` times its larger side, inside the image), resized to
    ``side`` x ``side``, the box outlined in ``colour``: (side, side, 3) uint8."""
    from PIL import Image, ImageDraw

    height, width = image.shape[:2]
    top, left, bh, bw = box
    win = int(round(min(max(bh, bw) * context, height, width)))
    win = max(1, win)
    cy, cx = top + bh / 2, left + bw / 2
    y0 = int(np.clip(round(cy - win / 2), 0, height - win))
    x0 = int(np.clip(round(cx - win / 2), 0, width - win))
    crop = Image.fromarray(np.ascontiguousarray(image[y0:y0 + win, x0:x0 + win]))
    scale = side / win
    pic = crop.resize((side, side), Image.BILINEAR)
    draw = ImageDraw.Draw(pic)
    rect = [(left - x0) * scale, (top - y0) * scale, (left - x0 + bw) * scale - 1, (top - y0 + bh) * scale - 1]
    draw.rectangle(rect, outline=tuple(int(v) for v in colour), width=2)
    return np.asarray(pic)


def gallery_grid(rows: Sequence[Sequence[np.ndarray]], colours: np.ndarray, labels: Sequence[str], *,
                 per_row: int = PER_CLUSTER, side: int = PATCH_SIDE) -> np.ndarray:
    """One picture, a row per cluster: a swatch of its colour with its label, then its patches
    (missing ones left white). (K * (side + GAP) + GAP, ...) uint8 RGB."""
    from PIL import Image, ImageDraw

    head = side  # the swatch column
    step = side + GAP
    canvas = Image.new("RGB", (GAP + head + per_row * step, GAP + len(rows) * step), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (patches, colour, label) in enumerate(zip(rows, colours, labels)):
        top = GAP + r * step
        draw.rectangle([GAP, top, GAP + head - 1, top + side - 1], fill=tuple(int(v) for v in colour))
        draw.rectangle([GAP + 4, top + side // 2 - 8, GAP + head - 5, top + side // 2 + 8], fill="white")
        draw.text((GAP + 8, top + side // 2 - 6), label[:14], fill="black")
        for j, pic in enumerate(patches[:per_row]):
            canvas.paste(Image.fromarray(pic), (GAP + head + GAP + j * step, top))
    return np.asarray(canvas)


def gallery_html(title: str, note: str, clusters: Sequence[dict], grid_src: str) -> str:
    """The page: the grid picture, then per cluster its name and patches with their source ids.

    ``clusters``: ``{"id", "name", "colour" (r, g, b), "patches": [{"src", "caption"}]}`` in cluster order;
    image links (``src``, ``grid_src``) are relative to the page.
    """
    from usseg_core.report import html_page

    def figure(p: dict) -> str:
        return (f"<figure><img src='{html.escape(p['src'])}' alt='{html.escape(p['caption'])}' width='{PATCH_SIDE}' "
                f"height='{PATCH_SIDE}'><figcaption>{html.escape(p['caption'])}</figcaption></figure>")

    rows = []
    for c in clusters:
        swatch = "#%02x%02x%02x" % tuple(int(v) for v in c["colour"])
        figures = "".join(figure(p) for p in c["patches"]) or "<p class='note'>no cell is assigned to it</p>"
        rows.append(f"<div class='cluster'><div class='name'><span class='swatch' style='background:{swatch}'>"
                    f"</span><b>{c['id']}</b> {html.escape(c['name'])}</div><div class='row'>{figures}</div></div>")
    style = ("<style>.cluster{display:flex;align-items:center;border-top:1px solid #ddd;padding:4px 0}"
             ".name{width:10em}.swatch{display:inline-block;width:1em;height:1em;margin-right:.4em;"
             "vertical-align:middle}.row{display:flex;flex-wrap:wrap}figure{margin:2px 4px;font-size:.7em;"
             "text-align:center}figure img{display:block}</style>")
    grid = f"<p><a href='{html.escape(grid_src)}'>the whole grid as one picture</a></p>"
    return html_page(title, [("How to read it", f"<p class='note'>{html.escape(note)}</p>{grid}"),
                             ("Clusters", style + "".join(rows))])


# --- names.yaml: cluster id -> name ---------------------------------------------------------------------

def read_names(path: str | Path) -> dict[int, str]:
    """``names.yaml``: a mapping of cluster id (an integer >= 0) to a name (a non-empty string); several
    clusters may share a name. Anything else is an :class:`InputError` naming the file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "no such names file (a YAML mapping of cluster id to name)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot be read as a text file ({err})") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise InputError(path, f"is not valid YAML{line}: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(data, dict) or not data:
        raise InputError(path, "must be a non-empty YAML mapping of cluster id to name, e.g. '0: sky'")
    names = {}
    for key, value in data.items():
        cid = key if isinstance(key, int) and not isinstance(key, bool) else None
        if isinstance(key, str) and key.strip().isdigit():
            cid = int(key)
        if cid is None or cid < 0:
            raise InputError(path, f"key {key!r} is not a cluster id (an integer >= 0)")
        if cid in names:
            raise InputError(path, f"cluster {cid} is named twice")
        if not isinstance(value, (str, int, float)) or isinstance(value, bool) or not str(value).strip():
            raise InputError(path, f"cluster {cid}: the name must be a non-empty string, got {value!r}")
        names[cid] = str(value).strip()
    return names


def check_names(names: dict[int, str], n_clusters: int, path: str | Path) -> None:
    """Every id of ``names`` must be a cluster of the model (0 .. n_clusters - 1)."""
    extra = sorted(c for c in names if c >= n_clusters)
    if extra:
        raise InputError(path, f"cluster {extra[0]} does not exist: the model has {n_clusters} clusters "
                               f"(ids 0 to {n_clusters - 1})")


def cluster_name(names: dict[int, str], cluster: int) -> str:
    """The name of ``cluster``: its entry of ``names``, else ``cluster_<id>``."""
    return names.get(cluster, f"cluster_{cluster}")


def names_template(n_clusters: int) -> str:
    """A names.yaml to copy and edit: every cluster with its default name."""
    lines = ["# names.yaml: cluster id -> name (usseg segment --names names.yaml); look at gallery.html",
             "# to see what each cluster holds. Clusters may share a name; a cluster left out keeps its id."]
    return "\n".join(lines + [f"{c}: cluster_{c}" for c in range(n_clusters)]) + "\n"
