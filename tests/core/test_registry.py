"""The head registry: names, errors, namespaced overrides, presets, save/load without Prefect."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from usseg_core.errors import ConfigError, InputError
from usseg_core.heads import get_head, list_heads, load_head, save_head
from usseg_core.heads.omh import OMHConfig
from usseg_core.heads.stego import StegoConfig


def test_builtin_heads_and_unknown_name():
    assert {"stego", "omh", "picie"} <= set(list_heads())
    with pytest.raises(ConfigError, match="unknown head 'potato'.*stego.*omh.*picie"):
        get_head("potato")
    assert get_head("stego").needs == {"five_crop", "knn"} and get_head("picie").needs == {"views"}


def test_overrides_are_namespaced_by_section():
    cfg = get_head("omh").config("camvid11", {"steps": 20, "omh.w_match": 0.1, "stego.lr": 1e-3})
    assert isinstance(cfg["stego"], StegoConfig) and isinstance(cfg["omh"], OMHConfig)
    assert cfg["stego"].steps == 20 and cfg["stego"].lr == 1e-3 and cfg["omh"].w_match == 0.1
    assert cfg["stego"].dim == 32  # the camvid11 preset survives an unrelated override
    assert get_head("picie").config("camvid11", {"picie.k_over": 50, "epochs": 2})["picie"].k_over == 50
    with pytest.raises(ConfigError, match="unknown field .w_match.*valid: .*steps.*namespaced: .*omh.w_match"):
        get_head("omh").config("camvid11", {"w_match": 0.1})
    with pytest.raises(ConfigError, match="no config section 'omh'.*sections: picie"):
        get_head("picie").config("camvid11", {"omh.w_match": 0.1})
    with pytest.raises(ConfigError, match="unknown field 'k_ovr'.*valid: .*k_over"):
        get_head("picie").config("camvid11", {"picie.k_ovr": 1})


def test_saved_head_loads_from_the_core_alone(tmp_path):
    spec = get_head("stego")
    cfg = spec.config("synthetic", {"dim": 4})
    ref = spec.load({"in_dim": 6, "code_dim": 4, "n_classes": 3, "config": {"stego": cfg["stego"].to_dict()},
                     "head": {}, "cluster": {}} | _random_stego_states())
    (tmp_path / "art").mkdir()
    save_head(tmp_path / "art" / "head.pt", "stego", 3, cfg,
              {"in_dim": 6, "code_dim": 4, "head": ref.head.state_dict(), "cluster": ref.probe.state_dict()})
    head = load_head(tmp_path / "art")  # the artifact folder, as a notebook would pass it
    feats = torch.randn(2, 6, 5, 5)
    assert torch.equal(head.codes(feats), ref.codes(feats)) and head.assign(head.codes(feats)).shape == (2, 5, 5)
    assert head.method == "stego" and head.clusterer == "cluster-probe" and not head.training
    with pytest.raises(InputError, match="no head checkpoint"):
        load_head(tmp_path / "missing")
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(InputError, match="unreadable"):
        load_head(tmp_path / "bad.pt")
    # no Prefect in the core: loading a head in a fresh interpreter imports none
    code = ("import sys; from usseg_core.heads import load_head; load_head(sys.argv[1]); "
            "assert not any(m == 'prefect' or m.startswith('prefect.') for m in sys.modules), 'prefect imported'")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "art")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _random_stego_states() -> dict:
    from usseg_core.heads.probes import ClusterProbe
    from usseg_core.heads.stego import StegoHead

    torch.manual_seed(0)
    return {"head": StegoHead(6, 4).state_dict(), "cluster": ClusterProbe(4, 3).state_dict()}


def test_the_torch_free_head_names_are_the_registry():
    """The CLI's help reads usseg_core/head_names.py (no torch import); it must list the registered heads."""
    from usseg_core.head_names import BUILTIN_HEADS
    from usseg_core.heads import get_head, list_heads

    assert sorted(BUILTIN_HEADS) == sorted(list_heads())
    assert all(get_head(h).summary == s for h, s in BUILTIN_HEADS.items())


def test_heads_declare_their_demo_and_capabilities():
    """HeadSpec says what flows used to find out by name or by probing (``hasattr(head, "levels")``)."""
    from usseg_core.head_names import BUILTIN_HEAD_CARDS
    from usseg_core.heads import demo_overrides
    from usseg_core.heads.builtin import StegoTrained
    from usseg_core.heads.hsg import HsgTrained
    from usseg_core.heads.picie import PicieTrained

    # the demo's lengths (each head's HeadSpec.demo): sized for a 3-minute demo on 2 cores (bench/demo.py)
    cause = {"clusterbook.concepts": 32, "clusterbook.batch_size": 8, "cause.front_steps": 10, "cause.probe_steps": 10,
             "cause.batch_size": 8, "cause.projection_dim": 128, "cause.tr_hidden": 128}
    assert demo_overrides(list(BUILTIN_HEAD_CARDS)) == {"stego.steps": 100, "stego.batch_size": 8, "picie.epochs": 4,
                                                         "hsg.epochs": 4, **cause}
    assert dict(get_head("cause-mlp").demo) == dict(get_head("cause-tr").demo) == cause
    assert dict(get_head("omh").demo) == {"stego.steps": 100, "stego.batch_size": 8}  # OMH's primary section is STEGO's
    from usseg_core.heads.cause import CauseTrained

    for name, trained in {"stego": StegoTrained, "omh": StegoTrained, "picie": PicieTrained, "hsg": HsgTrained,
                          "cause-mlp": CauseTrained, "cause-tr": CauseTrained}.items():
        spec = get_head(name)
        assert dict(spec.demo) == dict(BUILTIN_HEAD_CARDS[name].demo)
        assert spec.hierarchy == hasattr(trained, "levels"), name
        assert ("own" in spec.predictor_kinds) == (trained.clusterer is not None) == (spec.clusterer is not None)
    assert get_head("hsg").predictor_kinds == ("kmeans", "linear", "retrieval")
    assert get_head("stego").predictor_kinds == ("own", "kmeans", "linear")
    with pytest.raises(ConfigError, match="unknown field 'stepz'"):
        dataclasses.replace(get_head("stego"), name="_bad_demo", demo={"stego.stepz": 1})


def test_the_cli_starts_without_torch_or_prefect():
    import subprocess
    import sys

    code = "import sys, commands.cli; print(sorted({'torch', 'prefect'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_usseg_help_runs_without_torch_or_prefect():
    """The console entry point itself (not only the import) stays Prefect-free for --help: what it needs before a
    flow run is installed by the commands that run one (commands.launch.prepare_flow_process)."""
    import subprocess
    import sys

    code = ("import sys, atexit, commands.cli\n"
            "atexit.register(lambda: print('LOADED', sorted({'torch', 'prefect'} & set(sys.modules))))\n"
            "sys.argv = ['usseg', '--help']\n"
            "commands.cli.main()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout, out.stdout[-300:]


def test_the_registry_helper_guards_duplicates_and_names_the_known_entries():
    from usseg_core.registry import Registry

    loads = []
    reg: Registry[int] = Registry("widget", load=lambda: loads.append(1))
    one, two = object(), object()
    reg.register("b", one)
    reg.register("a", two)
    assert reg.register("b", one) is one  # the same object again (a re-imported module): no error
    with pytest.raises(ConfigError, match=r"widget 'b' is already registered"):
        reg.register("b", two)
    assert reg.names() == ["b", "a"] and "a" in reg and len(reg) == 2 and reg.get("a") is two
    with pytest.raises(ConfigError) as info:
        reg.get("c")
    assert str(info.value) == "unknown widget 'c'; known: b, a"
    reg.unregister("a")
    assert reg.names() == ["b"] and loads == [1]  # the lazy loader ran once, on the first read


def test_a_field_keyed_when_set_enters_the_key_only_off_its_default():
    from tasks.heads import head_key
    from usseg_core.heads import config_to_dict
    from usseg_core.config import KEYED_WHEN_SET

    @dataclasses.dataclass
    class Old:
        lr: float = 1e-3

    @dataclasses.dataclass
    class New:  # Old + an option added later whose default reproduces Old
        lr: float = 1e-3
        option: str = dataclasses.field(default="old-way", metadata=KEYED_WHEN_SET)

    inputs = {"views": [{"key": "v0"}]}
    key = lambda section: head_key("toy", 3, config_to_dict({"toy": section}), inputs)[0]  # noqa: E731
    assert config_to_dict({"toy": New()}) == {"toy": {"lr": 1e-3}}
    assert key(New()) == key(Old())  # (a) at its default the marked field leaves the key unchanged
    assert key(New(option="new-way")) != key(Old())  # (b) set, it changes the key and is recorded
    assert config_to_dict({"toy": New(option="new-way")}) == {"toy": {"lr": 1e-3, "option": "new-way"}}
    assert key(New(lr=1e-2)) != key(Old())  # an unmarked field is keyed as ever


def test_a_picie_head_saved_before_the_reference_options_loads_with_their_defaults(tmp_path):
    from usseg_core.heads.picie import PicieHead

    cfg = get_head("picie").config("camvid11")
    old = {k: v for k, v in cfg["picie"].to_dict().items()
           if k not in ("centroids", "kmeans", "normalise", "kmeans_init_images", "kmeans_update_images")}
    head = PicieHead(8, 4)
    mu = torch.tensor([[3.0, 0, 0, 0], [0, 2.0, 0, 0]])
    torch.save({"format": 2, "method": "picie", "n_classes": 2, "config": {"picie": old}, "in_dim": 8,
                "code_dim": 4, "head": head.state_dict(), "centroids": mu}, tmp_path / "head.pt")
    loaded = load_head(tmp_path)
    assert loaded.kind == "unit" and torch.allclose(loaded.centroids.norm(dim=1), torch.ones(2))
    # the paper datasets' heads record and restore the raw centroids
    save_head(tmp_path / "raw.pt", "picie", 2, get_head("picie").config("cocostuff27"),
              {"in_dim": 8, "code_dim": 4, "head": head.state_dict(), "centroids": mu})
    raw = load_head(tmp_path / "raw.pt")
    assert raw.kind == "raw" and torch.equal(raw.centroids, mu)


def test_a_plain_demo_runs_every_builtin_head_but_cause_tr_and_says_how_to_run_it(tmp_path, monkeypatch):
    """The demo's 3-minute budget (docs/results.md, The demo): the cards say which heads a plain `usseg demo`
    runs; the left-out head is one `--heads` away, and the demo's last lines say so."""
    from typer.testing import CliRunner

    import commands.compare as cli_compare
    from commands.cli import app
    from usseg_core.head_names import BUILTIN_HEAD_CARDS, DEFAULT_DEMO_HEADS

    assert DEFAULT_DEMO_HEADS == ("stego", "omh", "picie", "hsg", "cause-mlp")
    assert [n for n, c in BUILTIN_HEAD_CARDS.items() if not c.in_default_demo] == ["cause-tr"]
    seen = []

    def fake_compare(fields):  # what the demo asks the comparison for; stops before any work
        seen.append(fields)
        raise SystemExit(0)

    monkeypatch.setattr(cli_compare, "run_compare", fake_compare)
    base = ["demo", "--storage", str(tmp_path / "s"), "--n-train", "2", "--n-val", "1"]
    assert CliRunner().invoke(app, base).exit_code == 0
    assert CliRunner().invoke(app, [*base, "--heads", "cause-tr"]).exit_code == 0
    assert seen[0]["heads"] == list(DEFAULT_DEMO_HEADS) and "cause.front_steps" in seen[0]["overrides"]
    assert seen[1]["heads"] == ["cause-tr"] and seen[1]["overrides"]["cause.front_steps"] == 10
    result = {"path": str(tmp_path / "c"), "runs": [{"head": "stego", "head_key": "k", "evaluation_path": "e"}]}
    lines = cli_compare.next_steps(result, tmp_path, ("cause-tr",))
    assert lines[-1] == f"  5. the heads a plain demo leaves out for time: usseg demo --heads cause-tr --storage {tmp_path}"
    assert not any("leaves out" in line for line in cli_compare.next_steps(result, tmp_path))
