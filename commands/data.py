"""``usseg data check``: a dataset folder's layout, image/label pairing, label values and counts, in seconds
(the check itself: ``usseg_core/datasets/check.py``; ``usseg run`` and ``compare`` run it first)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from commands.common import EXIT_INPUT, DataRootOpt, say_data_problems
from usseg_core.datasets.check import DEFAULT_SAMPLE

console = Console()


def summary_table(report) -> Table:
    """One row per split: images, labels, published count, labels read, classes seen, void values."""
    from usseg_core.datasets.mappings import _ranges

    table = Table(title=f"{report.dataset} in {report.root}")
    for col in ("split", "images", "labels", "published", "read", "classes", "void (pixels)"):
        table.add_column(col, justify="left" if col in ("split", "void (pixels)") else "right")
    for s in report.splits:
        void = "-" if s.void_fraction is None else (
            f"{_ranges(list(s.void_values)) or 'none'} ({s.void_fraction:.1%})")
        table.add_row(s.split, f"{s.images:,}", "none" if s.labels is None else f"{s.labels:,}",
                      "-" if s.published is None else f"{s.published:,}", f"{s.labels_read:,}",
                      f"{len(s.classes_seen)}/{s.n_classes}" if s.labels_read else "-", void)
    return table


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(no_args_is_help=True, help="Check a dataset folder before any work.")
    app.add_typer(data_app, name="data")

    @data_app.command("check")
    def check(
        dataset: str = typer.Option(..., help="Dataset registry name (cocostuff27, cityscapes27, potsdam3, "
                                              "camvid11, directory)."),
        data_root: Optional[Path] = DataRootOpt,
        split: Optional[List[str]] = typer.Option(None, "--split", help="Split(s) to check, repeatable or "
                                                  "comma-separated (default: the published splits)."),
        all_labels: bool = typer.Option(False, "--all", help="Read every label (default: --sample per split)."),
        sample: int = typer.Option(DEFAULT_SAMPLE, "--sample", min=1, help="Labels read per split, evenly "
                                   "spaced over the sorted ids."),
    ) -> None:
        """Folders and list files, image/label pairing, label values against the dataset's mapping (which raw
        values are void) and counts against the published ones; one line per problem naming the file, exit 4
        on any error, else a table per split."""
        from orchestration.settings import data_root as resolve_data_root
        from usseg_core.datasets.check import check_data, needs_check
        from usseg_core.datasets.mappings import _ranges
        from usseg_core.datasets.registry import dataset_class

        dataset_class(dataset)  # "unknown dataset 'x'; known: ..." (exit 3)
        if not needs_check(dataset):
            console.print(f"{dataset}: rendered by usseg itself, nothing to check", markup=False)
            return
        splits = [s.strip() for item in split or [] for s in item.split(",") if s.strip()] or None
        root = resolve_data_root(dataset, data_root)
        report = check_data(dataset, root, splits, sample=None if all_labels else sample)
        say_data_problems(report.lines())
        if report.errors:
            raise typer.Exit(code=EXIT_INPUT)
        console.print(summary_table(report))
        read = "every label" if all_labels else f"up to {sample} labels per split, evenly spaced (--all: every one)"
        mapping = report.mapping
        if mapping is not None:
            valid = mapping.valid_raw_values()
            void = [int(v) for v in valid if mapping.table[v] < 0]
            read += (f"; raw values of the {mapping.name} mapping: {_ranges(valid)}, void (ignored): "
                     f"{_ranges(void) or 'none'}")
        console.print(f"labels read: {read}", markup=False, soft_wrap=True)
        n = len(report.warnings)
        console.print(f"ok ({n} warning{'s' * (n != 1)} above)" if n else "ok", markup=False)
