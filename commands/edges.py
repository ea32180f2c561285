"""`usseg edges` and `usseg ucm`: edge maps and OWT-UCM oversegmentations of image files.

Plain file-in / file-out commands over `usseg_core` (no Prefect): useful to inspect a detector or a
schedule on a few images. `register(app)` adds both commands to the project's Typer app.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer

from commands.common import fail
from usseg_core.edges import BUILTIN_DETECTORS
from usseg_core.errors import ConfigError, UssegError
from usseg_core.overseg import SCHEDULES

AUTO = "auto"
PIDINET_ENV = "USSEG_PIDINET_WEIGHTS"  # a PiDiNet .pth file (table5_pidinet.pth)
_PIDINET_FILES = {"pidinet": "table5_pidinet.pth", "pidinet-tiny": "table5_pidinet-tiny.pth"}
_DETECTOR_HELP = (f"Edge detector: {AUTO}, {', '.join(BUILTIN_DETECTORS)}. {AUTO} (default): PiDiNet when its "
                  f"weights are found (--weights, ${PIDINET_ENV}, or $USSEG_DATA_ROOT/../weights/pidinet/), "
                  "else the classical detector, which needs no file.")


def _pidinet_weights(variant: str) -> Optional[Path]:
    """Where the user keeps PiDiNet weights: ``$USSEG_PIDINET_WEIGHTS``, else the weights folder next to
    the data root (``$USSEG_DATA_ROOT/../weights/pidinet/<file>``, the data README's layout); None if absent."""
    import os

    from usseg_core.config import DATA_ROOT_ENV

    env = os.environ.get(PIDINET_ENV)
    if env and Path(env).is_file():
        return Path(env)
    root = os.environ.get(DATA_ROOT_ENV)
    if root:
        for folder in (Path(root).parent / "weights" / "pidinet", Path(root) / "weights" / "pidinet"):
            if (folder / _PIDINET_FILES[variant]).is_file():
                return folder / _PIDINET_FILES[variant]
    return None


def resolve_detector(detector: str, weights: Optional[Path]) -> tuple[str, Optional[Path]]:
    """(detector, weights) to build: ``auto`` picks PiDiNet with weights found, else ``classical``;
    ``pidinet``/``pidinet-tiny`` without ``--weights`` look in the same places."""
    if detector == AUTO:
        if weights is not None:
            return "pidinet", weights
        found = _pidinet_weights("pidinet")
        return ("pidinet", found) if found is not None else ("classical", None)
    if detector in _PIDINET_FILES and weights is None:
        return detector, _pidinet_weights(detector)
    return detector, weights


def _build_detector(detector: str, weights: Optional[Path], device: str):
    from usseg_core.edges import get_edge_detector

    name, w = resolve_detector(detector, weights)
    det = get_edge_detector(name, weights=w, device=device)
    typer.echo(f"edge detector: {name}" + (f" (weights {w})" if w is not None and name != "classical" else ""),
               err=True)
    return det


def _parse_levels(levels: Optional[str]) -> list[float]:
    if not levels:
        return []
    try:
        out = [float(v) for v in levels.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"--levels: expected comma-separated numbers like 0.1,0.3, got {levels!r}") from exc
    bad = [v for v in out if not 0.0 <= v <= 1.0]
    if bad:
        raise ConfigError(f"--levels: values must be in [0, 1], got {bad}")
    return out


def save_labels_png(path: Path, labels: np.ndarray) -> None:
    """Label map as PNG: 8-bit when it fits (<= 256 regions), else 16-bit."""
    from PIL import Image

    arr = labels.astype(np.uint8 if labels.max() <= 255 else np.uint16)
    Image.fromarray(arr).save(path)


def edges_command(
    images: list[Path] = typer.Argument(..., help="Image files (any format PIL reads)."),
    detector: str = typer.Option(AUTO, "--detector", help=_DETECTOR_HELP),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Model file for learned detectors."),
    out: Path = typer.Option(..., "--out", help="Output folder; writes <stem>.png (255 = strongest edge)."),
    device: str = typer.Option("cpu", "--device", help="torch device for learned detectors."),
) -> None:
    """Write an 8-bit edge-strength PNG per image, at the image's size."""
    from PIL import Image
    from rich.progress import Progress

    from usseg_core.imageio import read_rgb

    try:
        det = _build_detector(detector, weights, device)
        out.mkdir(parents=True, exist_ok=True)
        with Progress() as progress:
            task = progress.add_task(f"edges ({det.name})", total=len(images))
            for path in images:
                e = det(read_rgb(path))
                png = np.clip(np.rint(e.strength * 255.0), 0, 255).astype(np.uint8)
                Image.fromarray(png).save(out / f"{path.stem}.png")
                progress.advance(task)
    except UssegError as exc:
        fail(exc)


def ucm_command(
    images: list[Path] = typer.Argument(..., help="Image files."),
    detector: str = typer.Option(AUTO, "--detector", help=_DETECTOR_HELP),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Model file for learned detectors."),
    levels: Optional[str] = typer.Option(None, "--levels", help="Comma-separated UCM levels, e.g. 0.1,0.3."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help=f"HSG schedule: {', '.join(SCHEDULES)}."),
    out: Path = typer.Option(..., "--out", help="Output folder: <stem>.mat (ucm2) and <stem>_t<level>.png."),
    device: str = typer.Option("cpu", "--device", help="torch device for learned detectors."),
) -> None:
    """Write the ucm2 (.mat, key "ucm2") and region label PNGs at the requested / scheduled levels."""
    from rich.progress import Progress

    from usseg_core.imageio import read_rgb
    from usseg_core.overseg import choose_level
    from usseg_core.ucm import owt_ucm, save_ucm2_mat, ucm_labels

    try:
        lv = _parse_levels(levels)
        if schedule is not None and schedule not in SCHEDULES:
            raise ConfigError(f"--schedule: unknown {schedule!r}; known: {', '.join(SCHEDULES)}")
        det = _build_detector(detector, weights, device)
        out.mkdir(parents=True, exist_ok=True)
        with Progress() as progress:
            task = progress.add_task(f"ucm ({det.name})", total=len(images))
            for path in images:
                ucm2 = owt_ucm(det(read_rgb(path)))
                save_ucm2_mat(out / f"{path.stem}.mat", ucm2)
                for t in lv:
                    save_labels_png(out / f"{path.stem}_t{t:g}.png", ucm_labels(ucm2, t))
                if schedule is not None:
                    t, lab = choose_level(ucm2, SCHEDULES[schedule])
                    save_labels_png(out / f"{path.stem}_t{t:g}.png", lab)
                    progress.console.print(f"{path.stem}: {schedule} level {t:g}, {int(lab.max()) + 1} regions")
                progress.advance(task)
    except UssegError as exc:
        fail(exc)


def register(app: typer.Typer) -> None:
    """Add the `edges` and `ucm` commands to `app`."""
    app.command("edges")(edges_command)
    app.command("ucm")(ucm_command)
