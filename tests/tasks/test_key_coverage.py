"""Every parameter a stage passes to its core function is part of its key, for every stage.

:meth:`tasks.stage.Work.core` checks each keyword argument a stage hands the function doing its work (the
core function, or the shard task that calls it) against the stage's keyed ``params``, and refuses one that
is neither keyed nor declared unkeyed with a reason (``tests/tasks/test_stage.py`` shows it failing). This
test runs every declared stage once, through `usseg compare` of STEGO (five-crops + KNN), PiCIE (view
bank) and HSG (view bank + oversegmentation) with retrieval rows, and checks that each stage's core call
went through the check (a run that passed an unkeyed parameter would have failed). About 30 s on 2 cores.
"""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from tasks.stage import CALLED, CHECKED, STAGES

# Stages off the comparison's path (your own photos: the cluster gallery of `usseg run` on a folder, and flow
# `segment`): tests/flows/test_own_photos.py checks their core calls the same way after its runs.
# CAUSE's clusterbook: tests/flows/test_cause_pipeline.py checks its core call after its runs.
ELSEWHERE = {"gallery", "segment", "segment-report", "clusterbook"}
SETS = ("stego.steps=2", "stego.batch_size=4", "picie.epochs=1", "picie.batch_size=4", "hsg.epochs=1",
        "hsg.batch_size=4", "hsg.anchors_per_view=16", "views.n_views=2")


@pytest.mark.timeout(300)
def test_every_stage_hands_its_core_only_keyed_parameters(synthetic_small, tmp_path, monkeypatch, prefect_harness):
    from commands.cli import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    CALLED.clear()
    CHECKED.clear()
    res = CliRunner().invoke(app, ["compare", "--dataset", "synthetic", "--resolution", "64", "--no-crf",
                                   "--data-root", str(synthetic_small), "--storage", str(tmp_path / "storage"),
                                   "--heads", "stego,picie,hsg", "--seeds", "0", "--retrieval",
                                   *(a for s in SETS for a in ("--set", s))])
    assert res.exit_code == 0, f"{res.output}{res.exception!r}"
    missed = set(STAGES) - ELSEWHERE - CALLED
    assert not missed, f"stages whose core call was never checked: {sorted(missed)}"
    # the parameters that decide the contents were among the checked ones
    for stage, name in [("linear-probe", "lr"), ("kmeans", "k"), ("kmeans", "seed"), ("knn", "settings"),
                        ("head", "config"), ("features", "precision"), ("views", "view"),
                        ("oversegment", "schedule"), ("segment-memory", "grid"), ("evaluation", "crf")]:
        assert (stage, name) in CHECKED, (stage, name)
