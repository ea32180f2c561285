"""A paper-scale rehearsal: the whole STEGO pipeline, stage by stage, on synthetic datasets of growing N,
with each stage's wall time, peak memory, and the bytes and objects it wrote; growth exponents between the
two largest N; and what a warm (all cached) run costs beyond its imports.

    PYTHONPATH=. python bench/rehearsal.py --sizes 125 500 2000 [--s3 | --s3-sizes 125 500] [--out FILE.json]

For each N a synthetic set is rendered (``usseg_core.datasets.synthetic``: ``train`` = N street scenes of
``--height`` x ``--width`` px, ``val`` = a fixed ``--val`` scenes), and the pipeline of ``usseg run stego
--dataset synthetic --train-split train --eval-split val`` runs into a storage of its own, one stage at a
time, in this order (the tasks a flow run calls, ``flows/train.py``):

    manifest       the training split's manifest (sha256 of 2N files)
    features       the training split at the evaluation view (the linear probe's input)
    five-crops     the training split's five-crop features (5N items)
    knn            the neighbour table of the 5N pooled five-crop features (``knn.method=ivf``: approximate)
    train          the STEGO head, a fixed number of steps (streamed: ``$USSEG_FEATURE_MEMORY=0``)
    k-means        k-means over the head's codes and over the raw features (two artifacts)
    eval-features  the fixed evaluation sample's manifest, features and flipped features (constant work)
    linear-probe   the linear probe on the training split's features (epochs over N images)
    evaluation     the evaluation of every predictor on the fixed sample

Each stage is a Prefect flow run (against one Prefect server started for the rehearsal) in a process of
its own, forked from a process that imported torch, Prefect and the flows once: the stages before it are
cache hits, the stage's own call is timed, and the process's peak resident set (``ru_maxrss`` from
``os.wait4``) is the stage's peak. Because the forked process inherits the imports, its peak includes
them; the peak above the imports (the resident set when the stage began, imports and cache hits, is
subtracted) is printed beside it. Bytes and objects are those of the artifacts the stage committed: files
under ``storage/<stage>/<key>/`` locally, the bucket's listing of ``<prefix>/<stage>/<key>/`` on S3.

``--s3`` runs everything again on a SeaweedFS server on 127.0.0.1 (``tests/s3server.py``, the test
suite's S3 server; ``weed`` from the dev extra), ``--storage s3://usseg/rehearsal-<N>`` with a fresh local
mirror (``$USSEG_CACHE_DIR``) per N.

Growth: ``a = log(t2 / t1) / log(N2 / N1)`` between the two largest N (time ∝ N^a), and the peak-RSS ratio.
Targets: every stage's a <= 1 (linear or better; met at <= 1.1 to allow for timing noise on a shared
machine) but KNN's <= 1.2; peak RSS flat (ratio <= 1.2 for 4x N) for every stage but KNN (which holds the
5N x C pooled features in memory by design); the warm ``usseg run stego`` at the largest N at most 2 s
slower than the imports that command needs, measured in the same run (``python -c "import commands.cli,
flows.train"`` for the look-up pass, ``python -c "import commands.cli"`` for a recorded answer; the
fastest of ``--repeats`` of each, interleaved, so that both see the same load).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("manifest", "features", "five-crops", "knn", "train", "k-means", "eval-features", "linear-probe",
          "evaluation")
IN_MEMORY = {"knn": "holds the 5N x C pooled features (N-proportional by design)"}
COCO_IMAGES = 49_629  # COCO-Stuff's curated training images (248,145 five-crops)
LINEAR_MAX, KNN_MAX, RSS_MAX, WARM_MAX_S = 1.1, 1.2, 1.2, 2.0
REPLY = "REHEARSAL "  # the prefix of the fork server's replies on its stdout
QUIET = {"PREFECT_LOGGING_LEVEL": "WARNING", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
         "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


# --- what the run computes ----------------------------------------------------------------------------

def run_fields(args, data_root: Path, storage: str) -> dict:
    """The fields of ``usseg run stego`` (``RunSpec``) the stages and the warm command share."""
    return {"head": "stego", "dataset": "synthetic", "data_root": str(data_root), "train_split": "train",
            "eval_split": "val", "backbone": args.backbone, "random_weights": True, "resolution": args.resolution,
            "run_crf": args.crf, "device": "cpu", "storage": storage,
            "overrides": {"steps": args.steps, "batch_size": args.batch_size, "knn.method": "ivf"}}


def cli_args(fields: dict) -> list[str]:
    """The same run as a command line."""
    out = ["run", "stego", "--dataset", fields["dataset"], "--data-root", fields["data_root"], "--train-split",
           fields["train_split"], "--eval-split", fields["eval_split"], "--backbone", fields["backbone"],
           "--random-weights", "--resolution", str(fields["resolution"]), "--device", fields["device"],
           "--storage", fields["storage"], "--crf" if fields["run_crf"] else "--no-crf"]
    for key, value in fields["overrides"].items():
        out += ["--set", f"{key}={value}"]
    return out


def stage_body(spec, stage: str) -> dict:
    """Run the pipeline of ``spec`` up to ``stage`` (the stages before it are cache hits); time ``stage``.

    The calls are those of ``flows/train.py`` (``train_inputs``, ``train_stages``, ``evaluation_plan``,
    ``evaluate_stages``), split where a stage ends."""
    from flows.train import evaluation_plan, train_inputs, trained_stages
    from orchestration.refs import backbone_ref, data_ref, resolved
    from tasks.cluster import ensure_kmeans
    from tasks.evaluate import run_evaluation
    from tasks.extract import ensure_features
    from tasks.heads import ensure_head
    from tasks.inputs import INPUT_STAGES, InputContext
    from tasks.manifest import ensure_manifest
    from usseg_core.crf import CRFParams
    from usseg_core.views import ViewSpec

    spec = resolved(spec)
    storage, ref = spec.storage, backbone_ref(spec)
    train = data_ref(spec, spec.splits[0])
    ds = train.dataset()
    rows = {row.name: row for row in INPUT_STAGES}
    ctx = InputContext(spec, storage, ref, [train], ds)
    s: dict = {}

    def input_row(name: str) -> None:
        refs, _ = rows[name].ensure(ctx)
        ctx.inputs[rows[name].slot] = refs

    def prepared() -> None:
        s["prepared"] = train_inputs(spec)

    def head() -> None:
        p = s["prepared"]
        s["head"] = ensure_head(storage, spec.head, spec.dataset, p["n_classes"], p["inputs"], spec.head_settings(),
                                spec.device)

    def kmeans() -> None:
        p = s["prepared"]
        s["trained"] = trained_stages(
            p, s["head"], ensure_kmeans(storage, s["head"], p["cluster_on"], p["k"], seed=spec.seed, device=spec.device),
            ensure_kmeans(storage, None, p["cluster_on"], p["k"], seed=spec.seed, device=spec.device))

    def eval_features() -> None:  # the first lines of evaluation_plan
        data = data_ref(spec, spec.eval_split)
        manifest = ensure_manifest(data, storage)
        feats = ensure_features(storage, data, ref, data.dataset().protocol.eval_view(spec.eval_resolution),
                                manifest=manifest)
        ensure_features(storage, data, ref, ViewSpec.from_params(feats["view"]).flipped(), manifest=manifest)

    def plan() -> None:
        s["plan"] = evaluation_plan(s["trained"], spec)

    def evaluate() -> None:
        s["evaluation"] = run_evaluation(storage=storage, run_crf=spec.run_crf, crf=CRFParams(), device=spec.device,
                                         overcluster=spec.overcluster, **s["plan"])

    # (stage, untimed preparation, timed work)
    steps = [
        ("manifest", None, lambda: s.update(manifest=ensure_manifest(train, storage))),
        ("features", None, lambda: ensure_features(storage, train, ref, ds.protocol.eval_view(spec.eval_resolution),
                                                   manifest=s["manifest"])),
        ("five-crops", None, lambda: input_row("five_crop")),
        ("knn", None, lambda: input_row("knn")),
        ("train", prepared, head),
        ("k-means", None, kmeans),
        ("eval-features", None, eval_features),
        ("linear-probe", None, plan),
        ("evaluation", None, evaluate),
    ]
    assert [name for name, _, _ in steps] == list(STAGES)
    for name, prep, work in steps:
        if prep is not None:
            prep()
        if name != stage:
            work()
            continue
        rss_before = _rss_mib()
        t0 = time.perf_counter()
        work()
        return {"seconds": time.perf_counter() - t0, "rss_before_mib": rss_before}
    raise ValueError(f"unknown stage {stage!r}")


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# --- the fork server: imports once, one forked process per stage -------------------------------------------

def _stage_flow():
    """The flow every stage runs as (made in the process that imports the pipeline)."""
    from prefect import flow

    from orchestration.runner import SettingTaskRunner
    from usseg_core.spec import RunSpec, build

    @flow(name="rehearsal-stage", task_runner=SettingTaskRunner())
    def rehearsal_stage(fields: dict, stage: str) -> dict:
        return stage_body(build(RunSpec, **fields), stage)

    return rehearsal_stage


def _import_pipeline() -> float:
    """Import what every stage imports; the seconds it took."""
    t0 = time.perf_counter()
    import flows.train  # noqa: F401
    import psutil  # noqa: F401
    import tasks.evaluate  # noqa: F401
    import tasks.inputs  # noqa: F401

    return time.perf_counter() - t0


def stage_process(req: dict, flow=None) -> None:
    """Run one request's stage as a flow run (its output to the request's log); exits the process."""
    code = 1
    try:
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.update(req["env"])
        if flow is None:  # a fresh interpreter (--spawn)
            imports = _import_pipeline()
            flow = _stage_flow()
        else:
            imports = 0.0
        result = flow(req["fields"], req["stage"])
        Path(req["out"]).write_text(json.dumps({**result, "import_s": imports}))
        code = 0
    except BaseException:  # noqa: BLE001 - reported through the log and the exit code
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def fork_server() -> None:
    """Import the pipeline, then for each request line on stdin (JSON: stage, fields, env, out, log) fork a
    process that runs the stage as a flow run and writes its result to ``out``; reply on stdout with its
    exit code, wall time and ``ru_maxrss``. The server itself never runs torch work: a process forked after
    its parent used OpenMP threads can hang."""
    import threading

    imports = _import_pipeline()
    flow = _stage_flow()
    print(REPLY + json.dumps({"import_s": imports, "rss_mib": _rss_mib(), "threads": threading.active_count()}),
          flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            stage_process(req, flow)
        _, status, usage = os.wait4(pid, 0)
        print(REPLY + json.dumps({"rc": os.waitstatus_to_exitcode(status), "wall_s": time.perf_counter() - started,
                                  "maxrss_mib": usage.ru_maxrss / 1024}), flush=True)


class ForkServer:
    """Runs stages in processes forked from one that imported the pipeline (or, ``spawn``, each in a fresh
    interpreter that imports it: slower, and the import time is reported per stage)."""

    def __init__(self, env: dict, log: Path, spawn: bool = False) -> None:
        self.env, self.spawn = env, spawn
        if spawn:
            self.proc, self.ready = None, {"import_s": None, "rss_mib": None, "threads": None}
            return
        self.proc = subprocess.Popen([sys.executable, __file__, "--fork-server"], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "ab"))
        self.ready = self._reply()

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        raise RuntimeError(f"the fork server exited ({self.proc.wait()})")

    def run(self, stage: str, fields: dict, env: dict, work: Path) -> dict:
        out, log = work / f"{stage}.json", work / f"{stage}.log"
        out.unlink(missing_ok=True)
        req = {"stage": stage, "fields": fields, "env": env, "out": str(out), "log": str(log)}
        if self.spawn:
            started = time.perf_counter()
            proc = subprocess.Popen([sys.executable, __file__, "--stage-process", json.dumps(req)], cwd=REPO,
                                    env=self.env, stdin=subprocess.DEVNULL)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            reply = {"rc": proc.returncode, "wall_s": time.perf_counter() - started,
                     "maxrss_mib": usage.ru_maxrss / 1024}
        else:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            reply = self._reply()
        if reply["rc"] != 0:
            raise RuntimeError(f"stage {stage} failed ({reply['rc']}); the end of {log}:\n"
                               + log.read_text(errors="replace")[-3000:])
        return {**reply, **json.loads(out.read_text())}

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(60)


# --- Prefect server, artifacts on disk and on the bucket -------------------------------------------------

def start_prefect(home: Path, env: dict, timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """A Prefect server on 127.0.0.1 for every stage's flow run (one start, not one per process)."""
    from orchestration.service import free_port, healthy

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], cwd=REPO, env={**env, "PREFECT_HOME": str(home)},
                            stdout=open(home / "server.log", "ab"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"the Prefect server did not start; see {home / 'server.log'}")
        time.sleep(0.5)
    return proc, url


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, 15)  # its own session: the server and the workers it started
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(10)


def committed(storage: str) -> dict[str, tuple[int, int]]:
    """``{"stage/key": (objects, bytes)}`` of every complete artifact of ``storage`` (a folder or a URL)."""
    out: dict[str, tuple[int, int]] = {}
    if "://" in storage:
        from usseg_core.remote import RemoteStore

        remote = RemoteStore(storage)
        for stage in remote.list_dirs(""):
            if stage.startswith("_"):
                continue
            for key in remote.list_dirs(stage):
                if remote.commit_record(stage, key):
                    out[f"{stage}/{key}"] = (None, None)  # sized by the caller, once
        return out
    root = Path(storage)
    for marker in root.glob("*/*/_COMPLETE"):
        folder = marker.parent
        files = [p for p in folder.rglob("*") if p.is_file()]
        out[f"{folder.parent.name}/{folder.name}"] = (len(files), sum(p.stat().st_size for p in files))
    return out


def artifact_sizes(storage: str, names: list[str], known: dict) -> dict[str, tuple[int, int]]:
    if "://" not in storage:
        return {n: known[n] for n in names}
    from usseg_core.remote import RemoteStore

    remote = RemoteStore(storage)
    return {n: remote.artifact_size(*n.split("/")) for n in names}


# --- growth, targets, the table ------------------------------------------------------------------------

def exponent(n1: float, t1: float, n2: float, t2: float) -> float:
    """``a`` of ``t ∝ N^a`` through (n1, t1) and (n2, t2)."""
    return math.log(t2 / t1) / math.log(n2 / n1)


def growth(rows: list[dict]) -> list[dict]:
    """Per (backend, stage), the exponent and RSS ratios between the two largest N, and the verdicts."""
    out = []
    for backend in dict.fromkeys(r["backend"] for r in rows):
        for stage in STAGES:
            mine = sorted((r for r in rows if r["backend"] == backend and r["stage"] == stage), key=lambda r: r["n"])
            if len(mine) < 2:
                continue
            lo, hi = mine[-2], mine[-1]
            a = exponent(lo["n"], max(lo["seconds"], 1e-3), hi["n"], max(hi["seconds"], 1e-3))
            rss = hi["peak_rss_mib"] / lo["peak_rss_mib"]
            above = max(hi["rss_above_mib"], 1.0) / max(lo["rss_above_mib"], 1.0)
            a_max = KNN_MAX if stage == "knn" else LINEAR_MAX
            out.append({"backend": backend, "stage": stage, "n1": lo["n"], "n2": hi["n"], "a": a, "a_max": a_max,
                        "time_met": a <= a_max, "rss_ratio": rss, "rss_above_ratio": above,
                        "rss_target": stage not in IN_MEMORY,
                        "rss_met": rss <= RSS_MAX if stage not in IN_MEMORY else None})
    return out


def _size(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if b < 1000 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000
    return ""


def table(rows: list[dict], summary: list[dict], warm: list[dict]) -> str:
    """The markdown tables: per (backend, N, stage) the measurements; per stage the growth and verdicts;
    the warm runs."""
    lines = ["| backend | N | stage | wall s | peak RSS MiB | above imports MiB | objects | bytes |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['n']} | {r['stage']} | {r['seconds']:.2f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['rss_above_mib']:.0f} | {r['objects']} | {_size(r['bytes'])} |")
    lines += ["", "| backend | stage | N | a (time ∝ N^a) | target | peak RSS ratio | above-imports ratio | RSS target |",
              "|---|---|---|---:|---|---:|---:|---|"]
    for s in summary:
        rss = ("n/a (in memory by design)" if s["rss_met"] is None
               else f"{'met' if s['rss_met'] else 'MISSED'} (<= {RSS_MAX})")
        lines.append(f"| {s['backend']} | {s['stage']} | {s['n1']}→{s['n2']} | {s['a']:.2f} | "
                     f"{'met' if s['time_met'] else 'MISSED'} (<= {s['a_max']}) | {s['rss_ratio']:.2f} | "
                     f"{s['rss_above_ratio']:.2f} | {rss} |")
    if warm:
        lines += ["", "| backend | N | warm command | seconds | its imports s | beyond imports s | target |",
                  "|---|---:|---|---:|---:|---:|---|"]
        for w in warm:
            lines.append(f"| {w['backend']} | {w['n']} | {w['what']} | {w['seconds']:.2f} | {w['imports_s']:.2f} | "
                         f"{w['beyond_s']:.2f} | {'met' if w['met'] else 'MISSED'} (<= {WARM_MAX_S} s) |")
    return "\n".join(lines)


def wide_table(rows: list[dict], summary: list[dict]) -> str:
    """Per backend, one line per stage: wall time at every N, the exponent, peak RSS (and above the imports)
    at the two largest N, objects and bytes at the largest."""
    out = []
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == backend]
        sizes = sorted({r["n"] for r in mine})
        big = sizes[-2:]
        cells = {(r["stage"], r["n"]): r for r in mine}
        fits = {s["stage"]: s for s in summary if s["backend"] == backend}
        out += [f"{backend}: wall s at N = {', '.join(map(str, sizes))}; a between {' and '.join(map(str, big))}; "
                f"peak RSS MiB (above the imports) at {' and '.join(map(str, big))}; objects, bytes at {sizes[-1]}:", "",
                "| stage | " + " | ".join(f"s @ {n}" for n in sizes) + " | a | peak RSS MiB | objects | bytes |",
                "|---|" + "---:|" * len(sizes) + "---:|---:|---:|---:|"]
        for stage in STAGES:
            if (stage, sizes[-1]) not in cells:
                continue
            times = " | ".join(f"{cells[stage, n]['seconds']:.1f}" if (stage, n) in cells else "–" for n in sizes)
            fit = fits.get(stage)
            a = f"{fit['a']:.2f}{'' if fit['time_met'] else ' ✗'}" if fit else "–"
            rss = " → ".join(f"{cells[stage, n]['peak_rss_mib']:.0f} (+{cells[stage, n]['rss_above_mib']:.0f})"
                             for n in big if (stage, n) in cells)
            last = cells[stage, sizes[-1]]
            out.append(f"| {stage} | {times} | {a} | {rss} | {last['objects']} | {_size(last['bytes'])} |")
        out.append("")
    return "\n".join(out)


FIXED = ("train", "eval-features", "evaluation")  # work fixed by design: steps, the evaluation sample


def extrapolate(rows: list[dict], summary: list[dict], n: int, backend: str = "local") -> dict[str, float]:
    """Seconds of each stage at ``n`` training images, from the largest measured N: ``t * (n / N)^max(a, 1)``
    for the stages whose work grows with N (an upper bound where the fitted a < 1 reflects fixed costs), ``t``
    for the fixed ones. Only this machine's pipeline work at this bench's item size: no backbone or byte
    scaling (docs/results.md "Paper-scale rehearsal" adds those)."""
    fits = {s["stage"]: s for s in summary if s["backend"] == backend}
    out = {}
    for stage in STAGES:
        mine = sorted((r for r in rows if r["backend"] == backend and r["stage"] == stage), key=lambda r: r["n"])
        if not mine or stage not in fits:
            continue
        last = mine[-1]
        out[stage] = last["seconds"] if stage in FIXED else last["seconds"] * (n / last["n"]) ** max(fits[stage]["a"], 1.0)
    return out


# --- the warm command ---------------------------------------------------------------------------------

def _timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return seconds, done.stdout + done.stderr


def warm_runs(fields: dict, env: dict, backend: str, n: int, repeats: int) -> list[dict]:
    """``usseg run stego`` on the filled storage (no Prefect API: the look-up pass, then the recorded
    answer on a local storage), beside the imports it needs; the fastest of ``repeats`` each."""
    cli = [sys.executable, "-m", "commands.cli", *cli_args(fields)]
    imports = {"lookups": [sys.executable, "-c", "import commands.cli, flows.train"],
               "answer": [sys.executable, "-c", "import commands.cli"]}
    kinds = ["lookups"] + (["answer"] if backend == "local" else [])
    best: dict[str, list[float]] = {k: [math.inf, math.inf] for k in kinds}
    for i in range(repeats):
        for kind in kinds:
            best[kind][1] = min(best[kind][1], _timed(imports[kind], env)[0])
            # every USSEG_* variable is part of a recorded answer's id: a new value, a new look-up pass
            run_env = {**env, "USSEG_REHEARSAL_PASS": str(i) if kind == "lookups" else "answer"}
            seconds, out = _timed(cli, run_env)
            wanted = "answered by look-ups" if kind == "lookups" else "answered from"
            if kind == "answer" and i == 0 and wanted not in out:  # the first one recorded the answer
                seconds, out = _timed(cli, run_env)
            if wanted not in out:
                raise RuntimeError(f"the warm command was not {wanted!r}: some stage's artifact differs from "
                                   f"the run's:\n{out[-3000:]}")
            best[kind][0] = min(best[kind][0], seconds)
    names = {"lookups": "usseg run stego (look-up pass)", "answer": "usseg run stego (recorded answer)"}
    return [{"backend": backend, "n": n, "what": names[k], "seconds": s, "imports_s": imp, "beyond_s": s - imp,
             "met": s - imp <= WARM_MAX_S} for k, (s, imp) in best.items()]


# --- the rehearsal --------------------------------------------------------------------------------------

def rehearse(args, root: Path, say=print) -> dict:
    """Every (backend, N, stage); the growth summary; the warm runs at the largest N."""
    from usseg_core.datasets.synthetic import ensure_synthetic

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "USSEG_", "AWS_"))}
    env.update(QUIET, PYTHONPATH=str(REPO), USSEG_FEATURE_MEMORY="0")  # training streams, as at paper scale
    backends = ["local"] + (["s3"] if args.s3 else [])
    rows: list[dict] = []
    server = s3 = fork = None
    home = root / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    try:
        server, api = (None, args.prefect_api) if args.prefect_api else start_prefect(home, env)
        if args.s3:
            from tests.s3server import S3Server

            s3 = S3Server(root / "s3").start()
            os.environ.update(s3.env)  # this process lists the bucket (its children get the variables per stage)
        fork = ForkServer({**env, "PREFECT_HOME": str(home), "PREFECT_API_URL": api}, root / "fork-server.log",
                          spawn=args.spawn)
        if not args.spawn:
            say(f"fork server: imports {fork.ready['import_s']:.1f} s, {fork.ready['rss_mib']:.0f} MiB")
        warm: list[dict] = []
        for n in args.sizes:
            t0 = time.perf_counter()
            data = ensure_synthetic(Path(args.data_dir or root) / f"synthetic-{n}-{args.val}-{args.height}x{args.width}",
                                    n_train=n, n_val=args.val, height=args.height,
                                    width=args.width)
            say(f"N={n}: rendered {n} + {args.val} scenes in {time.perf_counter() - t0:.0f} s")
            for backend in backends:
                if backend == "s3" and args.s3_sizes and n not in args.s3_sizes:
                    continue
                work = root / f"{backend}-{n}"
                work.mkdir(exist_ok=True)
                stage_env = {"USSEG_CACHE_DIR": str(work / "cache")}
                if backend == "s3":
                    storage = s3.url(f"rehearsal-{n}")
                    stage_env.update(s3.env)
                else:
                    storage = str(work / "storage")
                fields = run_fields(args, data, storage)
                seen = committed(storage)
                for stage in STAGES[:STAGES.index(args.until) + 1]:
                    r = fork.run(stage, fields, stage_env, work)
                    now = committed(storage)
                    new = sorted(set(now) - set(seen))
                    sizes = artifact_sizes(storage, new, now)
                    seen = now
                    rows.append({"backend": backend, "n": n, "stage": stage, "seconds": r["seconds"],
                                 "process_s": r["wall_s"], "peak_rss_mib": r["maxrss_mib"],
                                 "rss_before_mib": r["rss_before_mib"], "import_s": r["import_s"],
                                 "rss_above_mib": max(0.0, r["maxrss_mib"] - r["rss_before_mib"]),
                                 "artifacts": new, "objects": sum(o for o, _ in sizes.values()),
                                 "bytes": sum(b for _, b in sizes.values()), "load_average": os.getloadavg()[0]})
                    x = rows[-1]
                    say(f"  {backend:>5} N={n:>6} {stage:>13}: {x['seconds']:8.2f} s  peak {x['peak_rss_mib']:6.0f} MiB "
                        f"(+{x['rss_above_mib']:.0f})  {x['objects']:>7} objects  {_size(x['bytes']):>9}  "
                        f"load {x['load_average']:.1f}")
                last = (args.s3_sizes or args.sizes)[-1] if backend == "s3" else args.sizes[-1]
                if n == last and args.repeats and args.until == STAGES[-1]:
                    wenv = {**env, **stage_env, "PREFECT_HOME": str(work / "warm-prefect-home")}
                    warm += warm_runs(fields, wenv, backend, n, args.repeats)
                    for w in warm[-2:]:
                        if w["backend"] == backend:
                            say(f"  {backend:>5} N={n:>6} warm {w['what']}: {w['seconds']:.2f} s, imports "
                                f"{w['imports_s']:.2f} s")
                if not args.keep and n != args.sizes[-1]:
                    shutil.rmtree(work / "storage", ignore_errors=True)
                    shutil.rmtree(work / "cache", ignore_errors=True)
    finally:
        if fork is not None:
            fork.close()
        if s3 is not None:
            s3.stop()
            for name in s3.env:
                os.environ.pop(name, None)
        stop(server)
    return {"rows": rows, "summary": growth(rows), "warm": warm, "fork_server": fork.ready if fork else None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[125, 500, 2000], help="training images N")
    ap.add_argument("--val", type=int, default=64, help="the fixed evaluation sample (images)")
    ap.add_argument("--height", type=int, default=48)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0", help="random weights (timing only)")
    ap.add_argument("--resolution", type=int, default=32, help="five-crop resolution")
    ap.add_argument("--steps", type=int, default=20, help="training steps (fixed in N)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--crf", action="store_true", help="evaluate with the dense CRF too")
    ap.add_argument("--s3", action="store_true", help="run on a SeaweedFS S3 server on 127.0.0.1 as well")
    ap.add_argument("--s3-sizes", type=int, nargs="+", default=None,
                    help="the N of the S3 runs (a subset of --sizes; default: all)")
    ap.add_argument("--until", choices=STAGES, default=STAGES[-1], help="the last stage to run")
    ap.add_argument("--repeats", type=int, default=2, help="warm runs (and import measurements) at the largest N")
    ap.add_argument("--prefect-api", default=None, help="use this Prefect API rather than starting a server")
    ap.add_argument("--dir", default=None, help="where data and storages go (default: a temporary folder)")
    ap.add_argument("--data-dir", default=None,
                    help="where the synthetic sets are rendered, reused when complete (default: under --dir)")
    ap.add_argument("--keep", action="store_true", help="keep the data and storages")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--spawn", action="store_true",
                    help="run each stage in a fresh interpreter rather than a process forked after the imports")
    ap.add_argument("--fork-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage-process", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if sorted(args.sizes) != args.sizes or len(set(args.sizes)) != len(args.sizes):
        ap.error("--sizes must be increasing")
    if args.s3_sizes and not set(args.s3_sizes) <= set(args.sizes):
        ap.error("--s3-sizes must be a subset of --sizes")
    if args.s3_sizes:
        args.s3 = True
    return args


def main() -> None:
    args = parse_args()
    if args.fork_server:
        fork_server()
        return
    if args.stage_process:
        stage_process(json.loads(args.stage_process))
    root = Path(tempfile.mkdtemp(prefix="usseg-rehearsal-", dir=args.dir))
    started, load0 = time.time(), os.getloadavg()
    try:
        result = rehearse(args, root, say=lambda line: print(line, flush=True))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    result.update(command=" ".join(["python", "bench/rehearsal.py", *sys.argv[1:]]), settings=vars(args) | {
        "out": str(args.out) if args.out else None}, load_average_start=load0, load_average_end=os.getloadavg(),
        cores=os.cpu_count(), minutes=(time.time() - started) / 60)
    print("\n" + table(result["rows"], result["summary"], result["warm"]))
    print("\n" + wide_table(result["rows"], result["summary"]))
    result["coco_scaled_s"] = extrapolate(result["rows"], result["summary"], COCO_IMAGES)
    print(f"scaled to N = {COCO_IMAGES} (this machine, this item size; see extrapolate()): "
          + ", ".join(f"{k} {v:.0f} s" for k, v in result["coco_scaled_s"].items()))
    print(f"\nload average {load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores; "
          f"{result['minutes']:.1f} min")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
