"""The exit-code table is true: docs/commands.md lists exactly the codes of commands/common.py EXIT_CODES
(which ``usseg --help`` prints), and one real command per code ends with that code and its one line."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.flows.test_cli_errors import REPO, _env, _images, long_extract, usseg


def _docs_exit_table() -> dict[int, str]:
    text = (REPO / "docs" / "commands.md").read_text()
    section = text[text.index("| exit code | meaning |"):]
    rows = re.findall(r"^\| (\d+) \| (.+?) \|$", section.split("\n\n")[0], flags=re.M)
    return {int(code): meaning for code, meaning in rows}


def test_the_docs_table_lists_exactly_the_exit_codes():
    from commands.common import EXIT_CODES, EXIT_CODES_HELP

    assert sorted(_docs_exit_table()) == sorted(EXIT_CODES) == [0, 1, 2, 3, 4, 5, 130]
    for code in EXIT_CODES:
        assert f"{code} {EXIT_CODES[code]}" in EXIT_CODES_HELP
    readme = (REPO / "README.md").read_text()
    assert "docs/commands.md" in readme and all(f"{c} " in readme for c in ("2", "3", "4", "5", "130"))


def test_exit_0_ok_and_2_usage(tmp_path):
    storage = tmp_path / "storage"
    storage.mkdir()
    done = usseg(tmp_path, "storage", "ls", "--storage", str(storage))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    done = usseg(tmp_path, "storage", "ls", "--no-such-option")
    assert done.returncode == 2 and "No such option" in done.stderr


def test_exit_3_config_and_4_input(tmp_path, prefect_api):
    storage = tmp_path / "storage"
    done = usseg(tmp_path, "run", "stego", "--dataset", "synthetic", "--set", "steps=abc", "--storage", str(storage))
    assert (done.returncode, done.stderr) == (3, "error: --set steps=abc: expected an integer (field 'steps' of "
                                                 "head 'stego' section 'stego')\n")
    data = _images(tmp_path / "data", 1)
    (data / "bad.png").write_bytes(b"\x89PNG not really")
    storage.mkdir()
    done = usseg(tmp_path, "extract", "--dataset", "directory", "--data-root", str(data), "--random-weights",
                 "--resolution", "64", "--storage", str(storage), api=prefect_api)
    assert done.returncode == 4 and done.stderr.splitlines()[-1].startswith(
        f"error: {data / 'bad.png'}: is not an image file Pillow can identify"), done.stderr
    assert not any((storage / "manifest").iterdir())  # the refused manifest left no empty folder


def test_exit_1_is_a_bug_with_its_traceback_in_the_log(tmp_path):
    """A real process whose command raises an unexpected error: exit 1, one line, traceback in the log."""
    storage = tmp_path / "storage"
    storage.mkdir()
    code = ("import sys, typer, commands.cli as cli\n"
            "@cli.storage_app.command('boom')\n"
            "def boom(storage: str = typer.Option(None, '--storage')):\n    raise RuntimeError('boom')\n"
            f"sys.argv = ['usseg', 'storage', 'boom', '--storage', {str(storage)!r}]\ncli.main()\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    log = storage / "logs" / "usseg-errors.log"
    assert done.returncode == 1, done.stderr
    assert done.stderr == f"error: unexpected RuntimeError: boom; traceback in {log}\n"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
def test_a_ctrl_c_that_python_drops_in_a_finalizer_still_exits_130(tmp_path):
    """A Ctrl-C arriving while a weakref finalizer runs raises there, and Python only prints "Exception
    ignored in ..." and carries on: the command must still end in the interrupted line and exit 130."""
    storage = tmp_path / "storage"
    storage.mkdir()
    code = ("import os, signal, sys, weakref, typer, commands.cli as cli\n"
            "class Thing: pass\n"
            "@cli.storage_app.command('drop')\n"
            "def drop(storage: str = typer.Option(None, '--storage')):\n"
            "    t = Thing()\n"
            "    weakref.finalize(t, lambda: os.kill(os.getpid(), signal.SIGINT))\n"
            "    del t\n"
            "    print('finished')\n"
            f"sys.argv = ['usseg', 'storage', 'drop', '--storage', {str(storage)!r}]\ncli.main()\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert "Exception ignored" in done.stderr and "finished" in done.stdout  # the interrupt was dropped
    assert done.returncode == 130, done.stderr
    assert done.stderr.splitlines()[-1] == "interrupted; finished artifacts are kept, rerun the command to resume"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
def test_exit_130_ctrl_c_is_one_line(tmp_path):
    cmd, env = long_extract(tmp_path, resolution=224)
    cli = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180  # until the flow's work has begun: the manifest folder exists
        while time.monotonic() < deadline and cli.poll() is None and not (tmp_path / "storage" / "manifest").exists():
            time.sleep(0.1)
        os.kill(cli.pid, signal.SIGINT)
        out, err = cli.communicate(timeout=120)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 130, out + err
    assert err.splitlines()[-1] == "interrupted; finished artifacts are kept, rerun the command to resume"
    assert "Traceback" not in out + err


def test_exit_5_disk_full_is_in_test_disk_full():
    """Exit 5 needs a real full disk: tests/flows/test_disk_full.py (RLIMIT_FSIZE)."""
    from commands.common import EXIT_DISK_FULL, exit_code
    from usseg_core.errors import DiskFull

    assert exit_code(DiskFull("/s", "features/k", "[Errno 28] No space left on device", 10, 0)) == EXIT_DISK_FULL == 5
