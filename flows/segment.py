"""Flow ``segment``: a trained head over a folder of images (or a dataset split, or image files).

segment: head artifact -> its backbone and clusterer -> the images (manifest | files)
         -> segment (image shards fanned out; per image labels, colours, overlay, pixels; resumable)
         -> segment-report (class areas under the cluster names, sample grid, index.html) [-> copy to --out]
Each stage is an artifact looked up by key first: a finished segmentation is a cache hit, one that was
interrupted segments only the images it had not done, and new names only write a new report.
"""
from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from orchestration.publish import in_flow_run, publish_run
from orchestration.refs import data_ref, resolved
from orchestration.runner import SettingTaskRunner
from orchestration.settings import storage_root
from tasks.manifest import ensure_manifest, load_manifest
from tasks.segment import ImageSet, ensure_segmentation, image_files, segment_model
from tasks.segment_report import ensure_segment_report, export_report
from usseg_core.gallery import check_names
from usseg_core.segment_spec import SegmentSpec

FLOW_NAME = "segment"


def images_of(spec: SegmentSpec) -> ImageSet:
    """The image files of the spec, or its dataset split (through the split's manifest)."""
    if spec.images:
        return image_files(spec.images)
    data = data_ref(spec, spec.split)
    manifest = ensure_manifest(data, spec.storage)
    entries = load_manifest(manifest)
    return ImageSet([(i, str(entries.image_path(i, data.root))) for i in entries.ids], manifest.hash, data)


def run_segment(spec: SegmentSpec) -> dict:
    """The flow's body: the model, the names checked against it, the images, the stages, the copy."""
    spec = spec.changed(storage=str(storage_root(spec.storage))) if spec.images else resolved(spec)
    model = segment_model(spec.storage, spec.model, clusterer=spec.clusterer, k=spec.k)
    names = spec.names_map()
    if spec.names is not None:
        check_names(names, model.n_clusters, spec.names)
    seg = ensure_segmentation(spec.storage, model, images_of(spec), crf=spec.run_crf, long_side=spec.long_side,
                              shard_size=spec.shard_size, device=spec.device)
    title = f"{model.method} head {model.head_key}: {len(seg.ids)} images, {model.n_clusters} clusters"
    report = ensure_segment_report(spec.storage, seg, names, title=title)
    out = {"segmentation": seg, "report": report}
    if spec.out is not None:
        out["exported"] = str(export_report(seg, report, spec.out))
    if in_flow_run():
        create_markdown_artifact(key="segment", description=title, markdown=(
            f"# {title}\n\nIndex page: `{report.path}`; class areas: `{report.areas}`"
            + (f"; copied to `{spec.out}`" if spec.out else "")))
    publish_run(spec.storage, FLOW_NAME, out)
    return out


@flow(name=FLOW_NAME, task_runner=SettingTaskRunner())
def segment(spec: SegmentSpec) -> dict:
    """Segment a folder (or a dataset split, or image files) with a trained head: label PNGs, colour maps,
    overlays, class areas (Parquet) and an index page (what `usseg segment` starts)."""
    return run_segment(spec)
