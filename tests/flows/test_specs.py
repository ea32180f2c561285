"""One spec from the command line to the flow: every run option of a command is a field of the spec its flow
takes (so a deployment can set it), every flow takes that spec as its only parameter, and a bad setting
fails with one line and exit code 3 before any server starts or any work is done."""
from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import typer.main

from usseg_core.errors import ConfigError
from usseg_core.spec import CompareSpec, EvaluateModelSpec, ExtractSpec, OversegmentSpec, RunSpec

REPO = Path(__file__).resolve().parents[2]
# Options that are about what a command prints or writes, not about the run it starts.
NOT_RUN_OPTIONS = {"results"}


def _command(name: str):
    from commands.cli import app

    group = typer.main.get_command(app)
    if " " in name:
        first, rest = name.split(" ", 1)
        return group.commands[first].commands[rest]
    return group.commands[name]


def _flows() -> dict:
    from flows import compare, evaluate_model, extract, oversegment, train

    out = {"pipeline": (train.pipeline, RunSpec), "compare": (compare.compare, CompareSpec),
           "extract-features": (extract.extract_features, ExtractSpec),
           "oversegment": (oversegment.oversegment_flow, OversegmentSpec),
           "evaluate-model": (evaluate_model.evaluate_model, EvaluateModelSpec)}
    out.update({f.name: (f, RunSpec) for f in (*train.TRAIN_FLOWS.values(), *train.EVALUATE_FLOWS.values())})
    return out


COMMANDS = {"run": ("pipeline", RunSpec), "compare": ("compare", CompareSpec),
            "extract": ("extract-features", ExtractSpec), "evaluate": ("evaluate-model", EvaluateModelSpec),
            "oversegment": ("oversegment", OversegmentSpec)}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_run_option_of_a_command_is_a_field_of_its_flows_spec(command):
    flow_name, model = COMMANDS[command]
    options = {p.name for p in _command(command).params} - NOT_RUN_OPTIONS
    missing = sorted(options - set(model.model_fields))
    assert not missing, (f"`usseg {command}` options {missing} are not fields of {model.__name__}, so flow "
                         f"{flow_name} (and its deployments) cannot take them")
    assert _flows()[flow_name][1] is model


def test_every_flow_takes_one_spec_and_prefect_sees_all_its_fields():
    from prefect.utilities.callables import parameter_schema

    for name, (flow, model) in _flows().items():
        hints = typing.get_type_hints(flow.fn)
        assert set(hints) - {"return"} == {"spec"}, f"flow {name}: parameters {sorted(hints)}"
        assert hints["spec"] is model, name
        schema = parameter_schema(flow.fn).model_dump()
        assert list(schema["properties"]) == ["spec"] and schema["required"] == ["spec"]
        (ref,) = [v for k, v in schema["definitions"].items() if k == model.__name__]
        assert set(ref["properties"]) == set(model.model_fields), name


def test_evaluate_and_train_flows_take_the_options_they_once_lacked():
    for field in ("on_error", "overcluster", "seed", "task_runner", "device"):
        assert field in RunSpec.model_fields and field in CompareSpec.model_fields or field == "seed"


def test_defaults_are_the_specs():
    from commands import common as cli_common

    assert cli_common.BackboneOpt.default == RunSpec.model_fields["backbone"].default
    assert cli_common.ResolutionOpt.default == RunSpec.model_fields["resolution"].default
    assert cli_common.OverclusterOpt.default == RunSpec.model_fields["overcluster"].default
    assert cli_common.RunnerOpt.default == RunSpec.model_fields["task_runner"].default


def test_seed_is_a_run_field_that_reaches_the_head_and_the_linear_probe(monkeypatch, synthetic_small):
    import flows.train as train

    run = RunSpec(head="stego", dataset="synthetic", overrides={"seed": 3, "steps": 5})  # --set seed=3: the field
    assert run.seed == 3 and "seed" not in run.overrides
    assert run.head_settings() == {"steps": 5, "stego.seed": 3}
    assert RunSpec(head="picie", dataset="synthetic", seed=2).head_settings() == {"picie.seed": 2}
    with pytest.raises(ConfigError, match="conflicts"):
        RunSpec(head="stego", dataset="synthetic", seed=2, overrides={"seed": 3})

    seen = {}
    monkeypatch.setattr(train, "ensure_manifest", lambda data, storage: {"path": "-", "n": 1})
    monkeypatch.setattr(train, "ensure_features", lambda *a, **kw: {"key": "f", "path": "-", "view": a[3].params()})
    monkeypatch.setattr(train, "ensure_linear_probe",
                        lambda *a, seed, **kw: seen.setdefault("seed", seed) and {"key": "p", "path": "-"})
    trained = {"n_classes": 5, "k": 5, "clusterer": None, "head": {"key": "h", "path": "-", "method": "stego"},
               "kmeans": {"key": "k", "path": "-"}, "raw_kmeans": {"key": "r", "path": "-"}}
    spec = RunSpec(head="stego", dataset="synthetic", data_root=str(synthetic_small), train_split="train,val",
                   eval_split="val", seed=4, retrieval=False)
    train.evaluation_plan(trained, spec)
    assert seen["seed"] == 4


def test_num_neighbors_is_checked_against_the_knn_tables_k():
    with pytest.raises(ConfigError, match=r"num_neighbors=40.*knn\.k"):
        RunSpec(head="stego", dataset="synthetic", overrides={"num_neighbors": 40})
    assert RunSpec(head="stego", dataset="synthetic", overrides={"num_neighbors": 40, "knn.k": 40}).knn_config().k == 40
    with pytest.raises(ConfigError, match="num_neighbors"):  # routed to STEGO and OMH alike
        CompareSpec(dataset="synthetic", heads=["omh"], overrides={"stego.num_neighbors": 31})


def _usseg(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "USSEG_STORAGE", "USSEG_STATE")}
    env.update(PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp_path / "prefect-home"), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "commands.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("args, says", [
    (["run", "stego", "--dataset", "synthetic", "--backbone", "vit_tiny"], "unknown backbone 'vit_tiny'; known"),
    (["run", "stego", "--dataset", "nope"], "unknown dataset 'nope'; known"),
    (["run", "nope", "--dataset", "synthetic"], "unknown head 'nope'; known"),
    (["run", "stego", "--dataset", "synthetic", "--set", "bogus=1"], "bogus"),
    (["run", "stego", "--dataset", "synthetic", "--set", "num_neighbors=40"], "num_neighbors <= 30"),
    (["compare", "--dataset", "synthetic", "--heads", "stego,nope"], "unknown head 'nope'; known"),
    (["extract", "--dataset", "synthetic", "--backbone", "vit_tiny"], "unknown backbone 'vit_tiny'; known"),
])
def test_a_bad_setting_is_one_line_and_exit_3_before_any_server_or_work(tmp_path, args, says):
    storage = tmp_path / "storage"
    done = _usseg(tmp_path, *args, "--storage", str(storage))
    assert done.returncode == 3, done.stdout + done.stderr
    (line,) = done.stderr.splitlines()  # one line: no traceback, no "Starting temporary server"
    assert line.startswith("error: ") and says in line, line
    assert done.stdout == "" and not storage.exists() and not (tmp_path / "prefect-home").exists()


def test_retrieval_labels_one_set_of_values_and_a_default_per_dataset():
    from usseg_core.datasets.protocol import RETRIEVAL_LABELS
    from usseg_core.datasets.registry import dataset_protocol
    from usseg_core.spec import RetrievalLabels, build

    assert typing.get_args(RetrievalLabels) == RETRIEVAL_LABELS  # the spec's and the protocols' values agree
    with pytest.raises(ConfigError, match="retrieval_labels"):
        build(RunSpec, head="hsg", dataset="synthetic", retrieval_labels="mode")
    assert build(RunSpec, head="hsg", dataset="synthetic").retrieval_labels is None  # None: the dataset's
    paper = {"cocostuff27", "cityscapes27", "potsdam3"}
    for name in paper | {"camvid11", "directory", "synthetic"}:
        assert dataset_protocol(name).retrieval_labels == ("reference" if name in paper else "valid-majority")
