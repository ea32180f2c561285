"""Write the ``deployments:`` section of ``prefect.yaml`` from the registries (heads x datasets).

    python deployments/generate.py            # rewrite deployments/prefect.yaml in place
    python deployments/generate.py --check    # exit 1 if the file is not what the registries give

Everything above the ``deployments:`` line (comments, pool, schedules, triggers, shared parameters) is
hand-written and kept as it is. Below it: ``train-<head>/<dataset>`` and ``evaluate-<head>/<dataset>``
for every registered head and every dataset with a folder (``usseg_core.datasets.dataset_folders``), then
``compare/<dataset>``, ``extract-features/<dataset>``, ``segment/<dataset>`` and ``watch-backbones/default``. A test checks that the shipped file is
exactly this output, so a new head or dataset cannot miss its deployments.

Every flow but the watcher takes one parameter, ``spec`` (usseg_core/spec.py: RunSpec, CompareSpec,
ExtractSpec): each deployment writes the fields that differ from the spec's defaults for its dataset, and
a run can set any other field of the spec (Prefect replaces the whole ``spec`` parameter of a run, so pass
the deployment's spec with your changes: ``usseg`` has no field a deployment cannot set).
"""
from __future__ import annotations

import sys
from pathlib import Path

FILE = Path(__file__).resolve().parent / "prefect.yaml"
MARK = "deployments:\n"


def _resolution(dataset: str) -> int:
    from usseg_core.datasets.synthetic import DEMO_RESOLUTION
    from usseg_core.spec import DEFAULT_RESOLUTION

    return DEMO_RESOLUTION if dataset == "synthetic" else DEFAULT_RESOLUTION


def _overrides(dataset: str, heads: list[str] | None) -> str:
    """Synthetic deployments train as long as ``usseg demo`` (each head's ``HeadSpec.demo``): that dataset
    exists to try things quickly, and the heads' paper lengths (STEGO 5000 steps) take 15+ minutes on 2
    cores there. ``heads`` None: every head (the compare deployment, whose overrides are routed per head)."""
    if dataset != "synthetic":
        return "{}"
    from usseg_core.heads import demo_overrides, list_heads

    chosen = demo_overrides(list_heads() if heads is None else heads)
    return "{" + ", ".join(f"{k}: {v}" for k, v in chosen.items()) + "}"


def _train(head: str, summary: str, dataset: str, folder: str) -> str:
    return f"""  - name: {folder}
    entrypoint: flows.train.train_{head}
    description: "train-{head} on {dataset}: {summary}"
    tags: [usseg, train-{head}, {folder}]
    parameters:
      spec:
        <<: [*backbone, *common]
        head: {head}
        dataset: {dataset}
        resolution: {_resolution(dataset)}
        overrides: {_overrides(dataset, [head])}
    work_pool: *pool
    schedules: [*training_weekly]
    triggers: [*on_lite0_changed]
"""


def _evaluate(head: str, dataset: str, folder: str) -> str:
    return f"""  - name: {folder}
    entrypoint: flows.train.evaluate_{head}
    description: "evaluate-{head} on {dataset}: train (cache look-ups when trained) + evaluate: clusterers, CRF, metrics, tables, pictures"
    tags: [usseg, evaluate-{head}, {folder}]
    parameters:
      spec:
        <<: [*backbone, *common, *evaluation]
        head: {head}
        dataset: {dataset}
        resolution: {_resolution(dataset)}
        overrides: {_overrides(dataset, [head])}
    work_pool: *pool
    schedules: [*evaluation_weekly]
    triggers: [*on_lite0_changed]
"""


def _compare(dataset: str, folder: str) -> str:
    return f"""  - name: {folder}
    entrypoint: flows.compare.compare
    description: "compare on {dataset}: every registered head x seeds 0, 1, 2 on one feature cache, one protocol, one report (storage/compare/<key>/report.html)"
    tags: [usseg, compare, {folder}]
    parameters:
      spec:
        <<: [*backbone, *common, *evaluation]
        dataset: {dataset}
        resolution: {_resolution(dataset)}
        heads: []            # [] = every registered head
        seeds: [0, 1, 2]
        overrides: {_overrides(dataset, None)}       # routed per head: stego.steps (STEGO and OMH), picie.epochs, hsg.epochs, views.*
    work_pool: *pool
    triggers: [*on_lite0_changed]   # no schedule: finished runs are cache hits, a new backbone retrains all
"""


def _extract(dataset: str, folder: str) -> str:
    return f"""  - name: {folder}
    entrypoint: flows.extract.extract_features
    description: "extract-features on {dataset}: dense features of the training split into the Zarr store"
    tags: [usseg, extract-features, {folder}]
    parameters:
      spec:
        <<: [*backbone, *common]
        dataset: {dataset}
        split: train
        policy: five_crop
        resolution: {_resolution(dataset)}
    work_pool: *pool
"""


def _segment(dataset: str, folder: str) -> str:
    return f"""  - name: {folder}
    entrypoint: flows.segment.segment
    description: "segment on {dataset}: a trained head's label maps, colour maps, overlays, class areas and index.html for the val split (cached, resumable per image)"
    tags: [usseg, segment, {folder}]
    parameters:
      spec:                # a run passes the whole spec, with "model": "<head key>" (usseg storage ls --stage head)
        <<: [*common]
        dataset: {dataset}
        split: val
        run_crf: true
    work_pool: *pool
"""


WATCH = """  # --- watch-backbones ------------------------------------------------------------------------
  - name: default
    entrypoint: flows.watch.watch_backbones
    description: "Fingerprint the deployments' backbone weights; emit usseg.backbone.changed on a change"
    tags: [usseg, watch]
    parameters:
      backbones: null     # null = every (backbone, weights) named by the deployments above
      storage: null
    work_pool: *pool
    schedules: [*watch_often]
"""


def _rule(title: str) -> str:
    return f"  # --- {title} " + "-" * max(3, 95 - len(title)) + "\n"


def render(header: str) -> str:
    """The whole file: ``header`` (up to and including ``deployments:``) + the generated deployments."""
    from usseg_core.datasets.registry import dataset_folders
    from usseg_core.heads import get_head, list_heads

    parts = [header]
    for head in list_heads():
        summary = get_head(head).summary.replace('"', "'")
        parts.append(_rule(f"train-{head}"))
        parts += [_train(head, summary, ds, folder) for ds, folder in dataset_folders().items()]
    for head in list_heads():
        parts.append(_rule(f"evaluate-{head}"))
        parts += [_evaluate(head, ds, folder) for ds, folder in dataset_folders().items()]
    parts.append(_rule("compare"))
    parts += [_compare(ds, folder) for ds, folder in dataset_folders().items()]
    parts.append(_rule("extract-features"))
    parts += [_extract(ds, folder) for ds, folder in dataset_folders().items()]
    parts.append(_rule("segment"))
    parts += [_segment(ds, folder) for ds, folder in dataset_folders().items()]
    parts.append(WATCH)
    return "".join(parts)


def header_of(text: str) -> str:
    if MARK not in text:
        raise SystemExit(f"{FILE}: no line '{MARK.strip()}'")
    return text[: text.index(MARK) + len(MARK)]


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(FILE.parents[1]))
    text = FILE.read_text()
    want = render(header_of(text))
    if "--check" in argv:
        if want != text:
            print(f"{FILE} is out of date: run python deployments/generate.py")
            return 1
        return 0
    FILE.write_text(want)
    print(f"wrote {FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
