"""Bad input and errors at the command line: one literal line on stderr, last, with the exit code of its kind
(2 usage, 3 configuration, 4 input/data, 1 unexpected); the temporary Prefect server dies with its parent."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path, api: str | None = None) -> dict:
    """A user's environment: no Prefect API configured (a flow run starts a temporary server), or ``api``
    configured as ``PREFECT_API_URL`` where the server plays no part in what a test checks."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "USSEG_STORAGE", "USSEG_STATE")}
    env.update(PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp_path / "prefect-home"), COLUMNS="80")
    if api:
        env["PREFECT_API_URL"] = api
    return env


def usseg(tmp_path: Path, *args: str, timeout: float = 300, api: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "commands.cli", *args], cwd=REPO, env=_env(tmp_path, api),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def long_extract(tmp_path: Path, resolution: int) -> tuple[list[str], dict]:
    """The command line and environment of an ``usseg extract`` of 24 images that runs as a flow run (a
    temporary server, no look-up pass): long enough to be interrupted or killed while it works."""
    data = _images(tmp_path / "data", 24)
    cmd = [sys.executable, "-m", "commands.cli", "extract", "--dataset", "directory", "--data-root", str(data),
           "--random-weights", "--resolution", str(resolution), "--storage", str(tmp_path / "storage")]
    return cmd, {**_env(tmp_path), "USSEG_FLOW_RUN": "always"}


def _images(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"im{i:03d}.png")
    return folder


def test_set_on_error_is_rejected_before_any_work(tmp_path):
    storage = tmp_path / "storage"
    done = usseg(tmp_path, "run", "stego", "--dataset", "synthetic", "--set", "on_error=skip",
                 "--storage", str(storage))
    assert done.returncode == 3
    assert done.stdout == ""
    assert done.stderr.splitlines()[-1] == (
        "error: --set on_error=skip: not a config setting; invalid files are handled by the option --on-error "
        "fail|skip of every command that reads images (here: --on-error skip)")
    assert not (storage / "features").exists() and not (storage / "data").exists()


def test_on_error_reaches_the_manifests_of_run_and_compare():
    """One spelling on every command that reads images: --on-error reaches every DataRef of the run."""
    from usseg_core.spec import CompareSpec, RunSpec

    run = RunSpec(head="stego", dataset="synthetic", on_error="skip")
    assert run.on_error == "skip"
    assert {r.on_error for r in CompareSpec(dataset="synthetic", heads=["stego", "picie"], seeds=[0, 1],
                                            on_error="skip").runs()} == {"skip"}
    import inspect

    from commands.cli import app  # noqa: F401
    from commands import compare as cli_compare
    from commands import run as cli_run
    from flows import compare, train

    assert "on_error" in _spec_of(train.pipeline).model_fields
    assert "on_error" in _spec_of(compare.compare).model_fields
    from orchestration.refs import data_ref

    assert data_ref(run, "val").on_error == "skip"
    src = inspect.getsource(train)
    assert src.count("data_ref(run, ") == 4 and "DataRef(" not in src  # train, eval, probe and gallery splits
    assert "on_error=on_error" in inspect.getsource(cli_run) and "on_error=on_error" in inspect.getsource(cli_compare)


def _spec_of(flow):
    """The model of a flow's one parameter, ``spec``."""
    import typing

    (name,) = typing.get_type_hints(flow.fn).keys() - {"return"}
    assert name == "spec"
    return typing.get_type_hints(flow.fn)["spec"]


def test_overcluster_option_reaches_the_evaluation_and_is_checked_first(tmp_path):
    import inspect

    from flows import train

    assert "overcluster" in _spec_of(train.pipeline).model_fields
    assert _spec_of(train.pipeline)(head="stego", dataset="synthetic",
                                    overcluster="reference-drop").overcluster == "reference-drop"
    assert "overcluster=run.overcluster" in inspect.getsource(train)
    done = usseg(tmp_path, "run", "stego", "--dataset", "synthetic", "--overcluster", "drop-all",
                 "--storage", str(tmp_path / "s"))
    flat = "".join(c for c in done.stderr if c.isalnum() or c in "-'")  # click's usage box wraps the line
    assert done.returncode == 2 and "--overcluster'drop-all'useoneofunmatched-wrongmajorityreference-drop" in flat
    assert not (tmp_path / "s" / "features").exists()


def test_unknown_set_key_lists_the_valid_ones_before_any_work(tmp_path):
    storage = tmp_path / "storage"
    done = usseg(tmp_path, "run", "stego", "--dataset", "synthetic", "--set", "stego.bogus=1",
                 "--storage", str(storage))
    assert done.returncode == 3, done.stderr
    (line,) = done.stderr.splitlines()  # one line, no traceback
    assert line.startswith("error: --set stego.bogus: unknown field 'bogus' of head 'stego'") and "valid: dim" in line
    assert not (storage / "features").exists()


def test_bad_on_error_value_is_a_usage_error(tmp_path):
    done = usseg(tmp_path, "extract", "--dataset", "directory", "--data-root", str(tmp_path),
                 "--on-error", "maybe", "--storage", str(tmp_path / "s"))
    assert done.returncode == 2
    assert "--on-error 'maybe': use fail or skip" in done.stderr


def test_storage_ls_of_a_missing_storage_is_one_error_line(tmp_path):
    missing = tmp_path / "nope"
    done = usseg(tmp_path, "storage", "ls", "--storage", str(missing))
    assert done.returncode == 3
    assert done.stdout == ""
    assert done.stderr == f"error: storage {missing} does not exist (pass --storage, or set $USSEG_STORAGE)\n"
    assert not missing.exists()  # no log folder created either


def test_storage_ls_piped_prints_whole_keys(tmp_path):
    from usseg_core.store import ArtifactStore

    store = ArtifactStore(tmp_path / "storage")
    key = "k" * 64
    art = store.begin("features", key, version=1, params={}, dataset="[weird]-dataset", backbone="b")
    store.finish(art)
    done = usseg(tmp_path, "storage", "ls", "--storage", str(tmp_path / "storage"))
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert rows[0][:3] == ["stage", "key", "dataset"]
    assert rows[1][:3] == ["features", key, "[weird]-dataset"] and rows[1][-1] == "yes"


def test_invalid_image_with_brackets_is_one_literal_line_exit_4(tmp_path, prefect_api):
    data = _images(tmp_path / "data", 2)
    (data / "[bad].jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    storage = tmp_path / "storage"
    storage.mkdir()
    done = usseg(tmp_path, "extract", "--dataset", "directory", "--data-root", str(data), "--random-weights",
                 "--resolution", "64", "--storage", str(storage), api=prefect_api)
    assert done.returncode == 4, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    log = storage / "logs" / "usseg-errors.log"
    assert done.stderr.splitlines()[-1] == (
        f"error: {data / '[bad].jpg'}: image data is truncated or corrupt (Truncated File Read) "
        f"(Prefect's log of the failed run: {log})")
    assert "Traceback" in log.read_text()  # kept, out of the terminal


def test_atomic_json_files_get_an_ordinary_mode(tmp_path):
    from usseg_core.store import atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "meta.json", {"a": 1})
        (tmp_path / "data.bin").write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "meta.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "meta.json").stat().st_mode) == stat.S_IMODE(
        (tmp_path / "data.bin").stat().st_mode)


def test_segment_kmeans_is_chosen_by_k(tmp_path):
    from tasks.segment import _kmeans_of
    from usseg_core.errors import ConfigError
    from usseg_core.store import ArtifactStore

    store = ArtifactStore(tmp_path)
    for key, k in (("kma", 27), ("kmb", 5), ("kmother", 5)):
        art = store.begin("kmeans", key, version=1, params={"k": k},
                          upstream={"head": "headkey" if key != "kmother" else "otherhead"})
        store.finish(art, k=k)
    assert _kmeans_of(store, "headkey", 5) == str(tmp_path / "kmeans" / "kmb" / "centroids.npy")
    assert _kmeans_of(store, "headkey", 27).endswith("kma/centroids.npy")
    with pytest.raises(ConfigError) as err:
        _kmeans_of(store, "headkey", 11)
    assert str(err.value) == "head headkey has no k-means artifact with K=11; available K: 5, 27 (pass --k K)"
    art = store.begin("kmeans", "kmc", version=1, params={"k": 5}, upstream={"head": "headkey"})
    store.finish(art, k=5)
    with pytest.raises(ConfigError, match=r"2 k-means artifacts with K=5 \(kmb, kmc\); available K: 5, 27"):
        _kmeans_of(store, "headkey", 5)


def _children(pid: int) -> list[tuple[int, str]]:
    out = []
    for st in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(st.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                cmd = (st.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                out.append((int(st.parent.name), cmd))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_temporary_server_dies_when_the_cli_is_killed(tmp_path):
    cmd, env = long_extract(tmp_path, resolution=64)
    cli = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    try:
        deadline = time.monotonic() + 180
        while server is None and time.monotonic() < deadline and cli.poll() is None:
            server = next((p for p, c in _children(cli.pid) if "prefect.server.api.server:create_app" in c), None)
            time.sleep(0.1)
        assert server is not None, "the CLI never started a temporary server"
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait()
        deadline = time.monotonic() + 15
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(server), f"temporary server {server} outlived its killed parent"
    finally:
        if cli.poll() is None:
            cli.kill()
        if server is not None and _alive(server):
            os.kill(server, signal.SIGKILL)


def test_unexpected_error_is_exit_1_with_the_traceback_in_the_storage_log(tmp_path, monkeypatch, capsys):
    from commands import common as cli_common

    from orchestration import console

    monkeypatch.setattr(sys, "argv", ["usseg", "run", "--storage", str(tmp_path)])
    monkeypatch.setattr(console, "FAILURE_RECORDS", [])
    # in-process: error_exit would stop every Prefect server of this process, the test session's one too
    monkeypatch.setattr(cli_common, "stop_temporary_server", lambda: None)
    try:
        raise RuntimeError("boom [x]")
    except RuntimeError as exc:
        with pytest.raises(SystemExit) as out:
            cli_common.error_exit(exc)
    assert out.value.code == 1
    log = tmp_path / "logs" / "usseg-errors.log"
    assert capsys.readouterr().err == f"error: unexpected RuntimeError: boom [x]; traceback in {log}\n"
    assert "Traceback" in log.read_text() and "boom [x]" in log.read_text()


def test_a_wrapped_usseg_error_keeps_its_exit_code(tmp_path, monkeypatch, capsys):
    from commands import common as cli_common
    from usseg_core.errors import InputError, WeightsError

    from orchestration import console

    monkeypatch.setattr(sys, "argv", ["usseg"])
    monkeypatch.setattr(console, "FAILURE_RECORDS", [])
    # in-process: error_exit would stop every Prefect server of this process, the test session's one too
    monkeypatch.setattr(cli_common, "stop_temporary_server", lambda: None)
    try:
        try:
            raise WeightsError("missing keys: ['blocks.0.attn.qkv.weight']")
        except WeightsError as inner:
            raise RuntimeError("flow run failed") from inner
    except RuntimeError as exc:
        with pytest.raises(SystemExit) as out:
            cli_common.error_exit(exc)
    assert out.value.code == 4
    assert capsys.readouterr().err == "error: missing keys: ['blocks.0.attn.qkv.weight']\n"
    assert cli_common.exit_code(InputError("a.png", "bad")) == 4


_FAILING_ON_A_WORKER = """
import sys
from prefect import flow, task
from orchestration import console
from orchestration.runner import SettingTaskRunner

@task
def boom():
    raise RuntimeError("boom on a worker")

@flow(task_runner=SettingTaskRunner(parameter="task_runner"))
def fails(task_runner: str = "dask:1"):
    return boom.submit().result()

console.DEBUG = len(sys.argv) > 1
console.quiet_prefect_console()  # what commands.launch.prepare_flow_process does before a CLI flow run
try:
    fails()
except RuntimeError as exc:
    print("raised:", exc)
"""


# --debug on a Dask worker: slow-marked to keep the default suite near 15 min (the plain case stays fast)
@pytest.mark.parametrize("debug", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_task_failing_on_a_dask_worker_keeps_its_traceback_off_the_terminal(tmp_path, debug, prefect_api):
    """A task that fails on a local Dask worker is logged by Prefect in the worker process, whose console is the
    terminal: the worker preload (orchestration/dask_worker.py) filters it as the CLI's own process does, and
    ``--debug`` ($USSEG_DEBUG=1, inherited by the workers) shows it again."""
    env = _env(tmp_path, prefect_api)  # the workers report to a configured API (no temporary server to start)
    if debug:
        env["USSEG_DEBUG"] = "1"
    done = subprocess.run([sys.executable, "-c", _FAILING_ON_A_WORKER, *(["debug"] if debug else [])], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert "raised: boom on a worker" in done.stdout, done.stdout + done.stderr
    assert ("Traceback" in done.stdout + done.stderr) == debug, done.stderr


def test_extract_accepts_a_file_name_that_is_not_utf8_and_skips_a_broken_one(tmp_path, prefect_api):
    """A folder copied from an old system: ``caf\\xe9.png`` (Latin-1) is extracted under an escaped id; a broken
    ``bad\\xe9.png`` is one escaped line under --on-error fail (exit 4) and listed escaped under skip."""
    data = _images(tmp_path / "data", 2)
    with open(os.path.join(os.fsencode(data), b"caf\xe9.png"), "wb") as fh:
        fh.write((data / "im000.png").read_bytes())
    with open(os.path.join(os.fsencode(data), b"bad\xe9.png"), "wb") as fh:
        fh.write(b"\x89PNG not really")
    storage = tmp_path / "storage"
    storage.mkdir()
    args = ("extract", "--dataset", "directory", "--data-root", str(data), "--random-weights", "--resolution", "64",
            "--storage", str(storage))
    done = usseg(tmp_path, *args, api=prefect_api)
    assert done.returncode == 4, done.stdout + done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"error: {data}/bad\\xe9.png: is not an image file Pillow can")
    done = usseg(tmp_path, *args, "--on-error", "skip", api=prefect_api)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(3 items)" in done.stdout
    last = done.stdout.splitlines()[-1]
    assert "; 1 files skipped (invalid; listed in " in last
    manifest = json.loads(Path(last.rsplit("listed in ", 1)[1].rstrip(")")).read_text())
    assert [e["id"] for e in manifest["entries"]] == ["caf\\xe9", "im000", "im001"]
    assert manifest["skipped"] == [{"id": "bad\\xe9", "path": "bad\\xe9.png",
                                    "problem": "is not an image file Pillow can identify"}]


def test_fail_prints_its_line_after_the_temporary_server_stopped(monkeypatch, capsys):
    """`usseg evaluate` (and `usseg import`) catch their own usseg errors with fail(): the temporary server is
    stopped first, so Prefect's "Stopping temporary server" line comes before the error line, never after."""
    import inspect

    import typer

    from commands import common as cli_common
    from commands import importing
    from orchestration import console
    from usseg_core.errors import InputError

    monkeypatch.setattr(console, "FAILURE_RECORDS", [])
    monkeypatch.setattr(cli_common, "OWNS_SERVER", True)  # as under commands.cli.main
    monkeypatch.setattr(cli_common, "stop_temporary_server",
                        lambda: print("INFO | prefect - Stopping temporary server", file=sys.stderr))
    with pytest.raises(typer.Exit) as out:
        cli_common.fail(InputError("/d/labels/a.png", "label value 7 is not in the mapping"))
    assert out.value.exit_code == 4
    assert capsys.readouterr().err.splitlines() == ["INFO | prefect - Stopping temporary server",
                                                    "error: /d/labels/a.png: label value 7 is not in the mapping"]
    assert "fail(exc)" in inspect.getsource(importing.evaluate_command)


def test_run_and_compare_say_which_files_were_skipped(tmp_path):
    """`usseg run` / `usseg compare --on-error skip` end with the line `extract` prints: per split, how many
    files were left out and the manifest listing them."""
    import inspect

    from commands import compare as cli_compare
    from commands import run as cli_run
    from commands.common import skipped_lines
    from tasks.manifest import DataRef, ensure_manifest
    from usseg_core.spec import CompareSpec, RunSpec, build

    data = _images(tmp_path / "data", 3)
    (data / "broken.png").write_bytes(b"\x89PNG not really")
    storage = tmp_path / "storage"
    run = build(RunSpec, head="picie", dataset="directory", data_root=str(data), train_split="all",
                eval_split=None, on_error="skip", storage=str(storage))
    assert skipped_lines(run) == []  # nothing built yet: look-ups only, nothing computed
    manifest = ensure_manifest.fn(DataRef("directory", str(data), "all", {}, "skip"), str(storage))
    assert skipped_lines(run) == [f"all: 1 files skipped (invalid; listed in {manifest.path})"]
    assert skipped_lines(run.changed(on_error="raise")) == []
    compare = build(CompareSpec, dataset="directory", data_root=str(data), heads=["picie"], seeds=[0],
                    train_split="all", eval_split=None, on_error="skip", storage=str(storage))
    assert skipped_lines(compare) == skipped_lines(run)
    for module in (cli_run, cli_compare):
        assert "for line in skipped_lines(spec):" in inspect.getsource(module)
