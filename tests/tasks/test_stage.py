"""The stage scaffold (tasks/stage.py): references, look-up, lineage, the look-up pass, and the check that
every parameter a stage hands its core is part of its key."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest

import tasks.cluster  # noqa: F401 - every stage module declares its stage at import
import tasks.compare  # noqa: F401
import tasks.evaluate  # noqa: F401
import tasks.inputs  # noqa: F401 - manifest, features, knn, head, kmeans, oversegment, views
import tasks.retrieval  # noqa: F401
from orchestration.publish import produced
from tasks.stage import (STAGES, ArtifactRef, FeaturesRef, ManifestRef, Stage, UnkeyedParameter, check_keyed,
                         run_stage)
from usseg_core.store import ArtifactStore, NotCached, artifact_key, lookups_only

TOY = Stage("toy", 1, "toy.fit", unkeyed={"device": "where it runs"})
PARAMS = {"lr": 5e-3, "epochs": 3}


def _fit(data, *, lr, epochs, device="cpu"):
    return {"data": data, "lr": lr, "epochs": epochs}


def _ref(art, hit):
    return ArtifactRef.of(art, str(art.path), hit)


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, fmt, *args) -> None:
        self.lines.append(fmt % args)


def _toy(storage, params=PARAMS, calls=None, log=None, **core_kwargs):
    def body(work):
        (calls if calls is not None else []).append(work.art.key)
        out = work.core(_fit, [1, 2], **({"lr": params["lr"], "epochs": params["epochs"]} | core_kwargs))
        work.art.file("out.txt").write_text(repr(out))
        return {"n_items": 2}

    upstream = {"features": FeaturesRef(stage="features", key="f0", path="/x", n=1, view={}, dataset="toyset",
                                        backbone="vit", backbone_fingerprint="fp",
                                        manifest=ManifestRef(stage="manifest", key="m", path="/m", hash="h", n=1))}
    return run_stage(str(storage), TOY, params, {"features": "f0"}, body, _ref, inputs=upstream.values(),
                     log=log or _Log())


def test_miss_then_hit_key_lineage_and_log(tmp_path):
    calls, log = [], _Log()
    first = _toy(tmp_path, calls=calls, log=log)
    again = _toy(tmp_path, calls=calls, log=log)
    assert first.key == artifact_key("toy", 1, PARAMS, {"features": "f0"}) == again.key and len(calls) == 1
    assert (first.cache_hit, again.cache_hit) == (False, True)
    assert log.lines == [f"cache hit: toy/{first.key}"]
    meta = ArtifactStore(tmp_path).get("toy", first.key).meta
    assert (meta["dataset"], meta["backbone"], meta["backbone_fingerprint"]) == ("toyset", "vit", "fp")
    assert meta["n_items"] == 2 and meta["upstream"] == {"features": "f0"}
    assert again.dataset == "toyset" and again.stage == "toy"


def test_lookups_only_miss_raises_before_any_work(tmp_path):
    calls: list = []
    with lookups_only(), pytest.raises(NotCached):
        _toy(tmp_path, calls=calls)
    assert calls == [] and not (tmp_path / "toy").exists()


def test_references_pickle_read_as_mappings_and_are_found_by_produced(tmp_path):
    ref = _toy(tmp_path)
    feats = FeaturesRef(stage="features", key="f0", path=str(tmp_path / "features" / "f0" / "features.zarr"),
                        n=1, view={}, manifest=ManifestRef(stage="manifest", key="m0", hash="h", n=1,
                                                           path=str(tmp_path / "manifest" / "m0" / "m.json")))
    assert pickle.loads(pickle.dumps(feats)) == feats
    assert ref["key"] == ref.key and dict(ref)["path"] == ref.path and ref.get("nope") is None
    assert feats["manifest"]["hash"] == "h" and "n" in feats
    found = produced({"trained": {"x": [ref]}, "features": feats})
    assert [(f["stage"], f["key"]) for f in found] == [("toy", ref.key), ("features", "f0"), ("manifest", "m0")]


# --- every parameter a stage passes to its core is part of its key ----------------------------------

def test_a_parameter_outside_the_key_fails(tmp_path):
    """The check can fail: a core argument that is not in the key (lr hard-coded beside the key's, an extra
    momentum) is refused before the core runs, and no artifact is completed."""
    check_keyed(TOY, PARAMS, {"lr": 5e-3, "epochs": 3, "device": "cuda"})  # keyed, or declared unkeyed
    with pytest.raises(UnkeyedParameter, match="lr=0.001"):
        check_keyed(TOY, PARAMS, {"lr": 1e-3})
    with pytest.raises(UnkeyedParameter, match="momentum"):
        _toy(tmp_path, momentum=0.9)
    assert not list(Path(tmp_path).glob("toy/*/_COMPLETE"))
    # the linear probe's learning rate: the one check this generalises
    probe = STAGES["linear-probe"]
    check_keyed(probe, {"epochs": 3, "seed": 0, "n_classes": 3, "lr": 5e-3}, {"lr": 5e-3, "epochs": 3})
    with pytest.raises(UnkeyedParameter, match="lr"):
        check_keyed(probe, {"epochs": 3, "seed": 0, "n_classes": 3}, {"lr": 5e-3, "epochs": 3})


def test_settings_objects_are_compared_as_their_key_form():
    from usseg_core.knn import KnnSettings

    knn = STAGES["knn"]
    settings = KnnSettings(k=7)
    check_keyed(knn, {"k": 7, **settings.key_params()}, {"k": 7, "settings": settings})
    with pytest.raises(UnkeyedParameter, match="settings"):
        check_keyed(knn, {"k": 7, **KnnSettings(k=7, method="exact").key_params()},
                    {"settings": KnnSettings(k=7, method="hnsw")})


def test_every_stage_is_declared_once_with_reasons():
    import tasks.clusterbook  # noqa: F401  (CAUSE's input stage)
    import tasks.gallery  # noqa: F401  (the own-photo stages: declared when their modules are imported)
    import tasks.segment  # noqa: F401
    import tasks.segment_report  # noqa: F401

    assert set(STAGES) == {"manifest", "features", "knn", "head", "kmeans", "linear-probe", "views",
                           "oversegment", "evaluation", "segment-memory", "compare", "gallery", "segment",
                           "segment-report", "clusterbook"}
    for stage in STAGES.values():
        assert all(reason.strip() for reason in stage.unkeyed.values()), stage.name


def test_no_stage_begins_an_artifact_outside_the_scaffold():
    root = Path(__file__).resolve().parents[2] / "tasks"
    offenders = [p.name for p in root.glob("*.py") if p.name != "stage.py" and ".begin(" in p.read_text()]
    assert offenders == []
