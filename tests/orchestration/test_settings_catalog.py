"""Resolution order of the settings, the deployments file, and the storage catalog (lineage, du, gc)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from orchestration import settings
from usseg_core.catalog import gc_plan, lineage, remove, usage
from usseg_core.errors import ConfigError
from usseg_core.store import ArtifactStore, artifact_key

DATASETS = {"cocostuff", "cityscapes", "potsdam", "camvid", "synthetic"}


def test_storage_root_order_flag_env_default(monkeypatch, tmp_path):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("USSEG_STORAGE", str(tmp_path / "env"))
    assert settings.storage_root(tmp_path / "flag") == tmp_path / "flag"
    assert settings.storage_root() == tmp_path / "env"
    assert settings.storage_root(f"file://{tmp_path}/url") == tmp_path / "url"
    monkeypatch.delenv("USSEG_STORAGE")
    assert settings.storage_root() == Path("./storage").resolve()
    monkeypatch.setenv("USSEG_CACHE_DIR", str(tmp_path / "cache"))
    remote = settings.storage_root("s3://bucket/usseg/")
    assert str(remote) == "s3://bucket/usseg" and remote / "_runs" == tmp_path / "cache/s3/bucket/usseg/_runs"
    for bad in ("ftp://bucket/x", "s3://bucket/a/../b", "s3://bucket//x"):
        with pytest.raises(ConfigError, match="storage"):
            settings.storage_root(bad)


def test_prefect_variable_sits_between_env_and_default(monkeypatch):
    monkeypatch.delenv("USSEG_STORAGE", raising=False)
    monkeypatch.setattr(settings, "prefect_variable", lambda name: {"usseg_storage": "/from/variable"}.get(name))
    assert settings.storage_root() == Path("/from/variable")
    monkeypatch.setenv("USSEG_STORAGE", "/from/env")
    assert settings.storage_root() == Path("/from/env")


def test_data_root_uses_the_dataset_folder_and_says_what_to_set(monkeypatch, tmp_path):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    (tmp_path / "camvid").mkdir()
    monkeypatch.setenv("USSEG_DATA_ROOT", str(tmp_path))
    assert settings.data_root("camvid11") == str(tmp_path / "camvid")
    assert settings.data_root("camvid11", tmp_path / "elsewhere") == str(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="cityscapes.*USSEG_DATA_ROOT|USSEG_DATA_ROOT.*cityscapes"):
        settings.data_root("cityscapes27")


def test_prefect_yaml_is_generated_from_the_registries():
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(repo / "deployments" / "generate.py"), "--check"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_prefect_yaml_has_every_head_dataset_with_schedules_and_triggers():
    from flows import train
    from usseg_core.heads import list_heads

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "deployments" / "prefect.yaml").read_text())
    flows = {f"flows.train.{kind}_{h}": f"{kind}-{h}" for kind in ("train", "evaluate") for h in list_heads()}
    flows["flows.extract.extract_features"] = "extract-features"
    names = {(flows.get(d["entrypoint"], d["entrypoint"]), d["name"]) for d in spec["deployments"]}
    for entrypoint, flow in flows.items():
        assert {(flow, ds) for ds in DATASETS} <= names
        module, attr = entrypoint.rsplit(".", 1)
        if module == "flows.train":
            assert getattr(train, attr).name == flow  # the entrypoint is a flow of that name
    for dep in spec["deployments"]:
        assert dep["work_pool"]["name"] == "usseg"
        params = dep["parameters"].get("spec", dep["parameters"])  # every flow but the watcher: one spec
        assert params.get("data_root") is None and params.get("storage") is None  # never hard-coded
        if dep["entrypoint"].startswith("flows.train."):
            assert dep["schedules"][0]["cron"] and dep["schedules"][0]["active"] is True
            trig = dep["triggers"][0]
            assert trig["expect"] == ["usseg.backbone.changed"]
            assert trig["match"]["prefect.resource.id"] == f"usseg.backbone.{params['backbone']}"
            assert params["task_runner"] == "threads"
    watch = [d for d in spec["deployments"] if d["entrypoint"] == "flows.watch.watch_backbones"]
    assert len(watch) == 1 and watch[0]["schedules"][0]["cron"]


def test_synthetic_deployments_train_as_long_as_the_demo():
    """The synthetic deployments exist to try things quickly: the demo's lengths, the papers' elsewhere."""
    from usseg_core.heads import demo_overrides, list_heads

    DEMO_OVERRIDES = demo_overrides(list_heads())  # what the generator writes for the compare deployment
    from usseg_core.heads import get_head
    from usseg_core.spec import RunSpec

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "deployments" / "prefect.yaml").read_text())
    seen = 0
    for dep in spec["deployments"]:
        params, entry = dep["parameters"].get("spec", {}), dep["entrypoint"]
        if params.get("dataset") != "synthetic" or "overrides" not in params:
            continue
        seen += 1
        if entry == "flows.compare.compare":
            assert params["overrides"] == DEMO_OVERRIDES
            continue
        head = entry.rsplit("_", 1)[1]
        cfg = get_head(head).config("synthetic", RunSpec(head=head, dataset="synthetic",
                                                         overrides=params["overrides"]).head_overrides())
        steps = getattr(cfg.get("stego"), "steps", None)
        assert steps in (None, DEMO_OVERRIDES["stego.steps"]), (dep["name"], entry)
        for section in ("picie", "hsg"):
            if section in cfg:
                assert cfg[section].epochs == DEMO_OVERRIDES[f"{section}.epochs"]
        if "cause" in cfg:
            assert cfg["cause"].front_steps == DEMO_OVERRIDES["cause.front_steps"]
            assert cfg["clusterbook"].concepts == DEMO_OVERRIDES["clusterbook.concepts"]
    assert seen == len(list_heads()) * 2 + 1  # train + evaluate per head, and compare
    others = [d["parameters"]["spec"] for d in spec["deployments"]
              if d["parameters"].get("spec", {}).get("dataset") == "camvid11" and "overrides" in d["parameters"]["spec"]]
    assert others and all(p["overrides"] == {} for p in others)


def _artifact(store, stage, params, upstream=None, complete=True):
    key = artifact_key(stage, 1, params, upstream)
    art = store.begin(stage, key, version=1, params=params, upstream=upstream)
    art.file("x.bin").write_bytes(b"0" * 100)
    if complete:
        store.finish(art)
    return key


def test_lineage_du_and_gc(tmp_path):
    store = ArtifactStore(tmp_path)
    manifest = _artifact(store, "manifest", {"split": "train"})
    feats = _artifact(store, "features", {"r": 224}, {"manifest": manifest, "backbone": "f" * 64})
    knn = _artifact(store, "knn", {"k": 30}, {"features0": feats})
    orphan = _artifact(store, "knn", {"k": 5}, {"features0": feats})
    broken = _artifact(store, "head", {"steps": 1}, {"knn": knn}, complete=False)

    tree = lineage(store, knn[:8])
    assert tree.keys() == {knn, feats, manifest}
    externals = [c.value for c in tree.children[0].children if c.artifact is None]
    assert externals == ["f" * 64]  # the backbone fingerprint is an input, not an artifact

    rows = {r.stage: r for r in usage(store)}
    assert rows["knn"].n_complete == 2 and rows["head"].n_incomplete == 1 and rows["knn"].bytes > 200

    assert [i.artifact.key for i in gc_plan(store, set(), min_age_s=3600)] == []  # incomplete but fresh
    plan = gc_plan(store, referenced={knn}, unreferenced=True, min_age_s=0)
    assert {(i.artifact.key, i.reason) for i in plan} == {(broken, "incomplete"), (orphan, "unreferenced")}
    remove(store, plan)
    assert {a.key for a in store.iter_artifacts()} == {manifest, feats, knn}
