"""The ``segment-report`` stage: a segmentation's class areas under the names a person gave the clusters
(``areas.parquet``), a sample grid of overlays and ``index.html``; and the export of both into a folder
of the user's (``usseg segment --out DIR``).

Names are this stage's parameter only: naming (or renaming) the clusters of a finished segmentation
writes a new report and segments nothing again.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.segment import IMAGES, SegmentRef, stem_of
from tasks.stage import ArtifactRef, Work, declare, run_stage, stage_task
from usseg_core.gallery import cluster_name
from usseg_core.segment_index import AREA_COLUMNS, SAMPLE, area_rows, index_html, sample_grid, sample_ids

REPORT_VERSION = 1
REPORT = declare("segment-report", REPORT_VERSION, "usseg_core.segment_index.area_rows")


@dataclass(frozen=True, kw_only=True)
class SegmentReportRef(ArtifactRef):
    """A segmentation's report: ``path`` is index.html; ``areas`` the Parquet table, ``images`` the folder
    of the per-image pictures (in the segmentation), ``n_images``."""

    areas: str
    images: str
    n_images: int


def _link_base(seg: SegmentRef) -> str:
    """Where the page's links find the pictures: the segmentation's folder, relative to the report's
    (``<storage>/segment-report/<key>/`` beside ``<storage>/segment/<key>/``)."""
    return f"../../segment/{seg['key']}/{IMAGES}/"


def _write(folder: Path, seg: SegmentRef, rows: list[dict], names: dict[int, str], title: str) -> None:
    import pandas as pd

    from usseg_core.imageio import read_rgb
    from usseg_core.viz import palette, save_png

    pd.DataFrame(rows, columns=list(AREA_COLUMNS)).to_parquet(folder / "areas.parquet", index=False)
    images = Path(seg["path"]) / IMAGES
    tiles = [(i, read_rgb(images / f"{stem_of(i)}_overlay.png")) for i in sample_ids(seg["ids"])]
    save_png(folder / "overlays.png", sample_grid(tiles))
    n = int(seg["n_clusters"])
    totals = np.zeros(n)
    area = sum(r["pixels"] / r["fraction"] for r in rows if r["fraction"] > 0) / max(1, len(seg["ids"]))
    for r in rows:
        totals[r["class_id"]] += r["pixels"]
    total = totals.sum() or 1.0
    legend = [{"id": c, "name": cluster_name(names, c), "colour": colour, "fraction": totals[c] / total}
              for c, colour in enumerate(palette(max(n, 1))[:n])]
    note = (f"{len(seg['ids'])} images, {n} clusters (about {area:.0f} pixels an image); names from names.yaml "
            "where given, else cluster_<id>. Per image: the overlay, the colour map and the label PNG (cluster "
            "ids); areas.parquet holds the table.")
    page = index_html(title, note, ids=seg["ids"], stems=[stem_of(i) for i in seg["ids"]], areas=rows,
                      legend=legend, grid_src="overlays.png", base=_link_base(seg))
    (folder / "index.html").write_text(page, encoding="utf-8")


@stage_task("segment-report")
def ensure_segment_report(storage: str, seg: SegmentRef, names: dict[int, str], *, title: str) -> SegmentReportRef:
    """The report of segmentation ``seg`` with cluster ``names`` (found by key, or written)."""
    params = {"names": {str(c): names[c] for c in sorted(names)}, "sample": SAMPLE}
    upstream = {"segment": seg["key"]}

    def body(work: Work) -> dict:
        import pandas as pd

        pixels = pd.read_parquet(Path(seg["path"]) / "pixels.parquet").to_dict("records")
        rows = work.core(area_rows, pixels, names=names)
        _write(work.art.path, seg, rows, names, title)
        return {"n_images": len(seg["ids"])}

    def ref(art, hit: bool) -> SegmentReportRef:
        return SegmentReportRef.of(art, str(art.file("index.html")), hit, areas=str(art.file("areas.parquet")),
                                   images=str(Path(seg["path"]) / IMAGES), n_images=int(art.meta["n_images"]))

    return run_stage(storage, REPORT, params, upstream, body, ref, inputs=[seg], info={"title": title})


def export_report(seg: SegmentRef, report: SegmentReportRef, out: str | Path) -> Path:
    """Copy the per-image pictures, ``areas.parquet``, ``overlays.png`` and ``index.html`` (its links made
    local) into ``out``; a file already there with the same size is left alone. Returns the page's path."""
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(report["path"]).parent
    sources = [p for p in sorted(Path(report["images"]).iterdir()) if p.suffix == ".png"]
    sources += [folder / "areas.parquet", folder / "overlays.png"]
    for src in sources:
        dst = out / src.name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            shutil.copyfile(src, dst)
    page = (folder / "index.html").read_text(encoding="utf-8").replace(_link_base(seg), "")
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"
