"""The evaluation's over-clustering option: scores, the rows' ``overcluster`` column, the artifact key."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from tasks import evaluate as ev
from usseg_core.metrics import hungarian_scores

CM = np.array([[50, 4], [3, 40], [0, 0], [7, 9]])  # 4 clusters, 2 classes
GROUPS = [{"method": "stego", "predictors": [{"name": "probe", "kind": "own", "label": "cluster-probe"},
                                             {"name": "lin", "kind": "linear", "label": "linear"}]}]
CMS = {"probe|no": CM, "lin|no": np.array([[50, 4], [3, 40]])}


@pytest.mark.parametrize("mode", ["unmatched-wrong", "majority", "reference-drop"])
def test_rows_are_scored_with_and_name_the_protocol(mode):
    rows = ev._score_rows(CMS, GROUPS, ["a", "b"], mode)
    probe, lin = rows
    assert probe["overcluster"] == mode and lin["overcluster"] == "identity"
    assert list(probe)[:4] == ["method", "clusterer", "crf", "overcluster"]
    assert probe["miou"] == round(100 * hungarian_scores(CM, overcluster=mode).miou, 2)


def test_protocols_give_different_rows():
    m = {mode: ev._score_rows(CMS, GROUPS, ["a", "b"], mode)[0]["miou"]
         for mode in ("unmatched-wrong", "majority", "reference-drop")}
    assert len(set(m.values())) == 3, m


def test_old_artifact_rows_get_the_default_column():
    rows = [{"method": "stego", "clusterer": "cluster-probe", "crf": False, "accuracy": 1.0, "miou": 1.0},
            {"method": "stego", "clusterer": "linear", "crf": False, "accuracy": 1.0, "miou": 1.0}]
    art = SimpleNamespace(meta={"params": {"run_crf": False}, "rows": rows, "columns": list(rows[0])})
    got = ev.evaluation_rows(art)
    assert [r["overcluster"] for r in got] == ["unmatched-wrong", "identity"]
    assert list(got[0])[3] == "overcluster"
    art.meta["params"]["overcluster"] = "reference-drop"
    assert ev.evaluation_rows(art)[0]["overcluster"] == "reference-drop"


def test_key_changes_only_for_a_non_default_protocol(monkeypatch, tmp_path):
    keys = []
    monkeypatch.setattr(ev, "eval_key", lambda params, upstream: keys.append(dict(params)) or "k")

    class Stop(Exception):
        pass

    monkeypatch.setattr(ev.ArtifactStore, "get", lambda self, stage, key: (_ for _ in ()).throw(Stop()))
    view = SimpleNamespace(params=lambda: {})
    for mode in ("unmatched-wrong", "reference-drop"):
        with pytest.raises(Stop):
            ev.run_evaluation(str(tmp_path), None, {}, view, {"key": "f"}, None, [], [], overcluster=mode)
    assert "overcluster" not in keys[0] and keys[1]["overcluster"] == "reference-drop"
    with pytest.raises(ValueError, match="overcluster"):
        ev.run_evaluation(str(tmp_path), None, {}, view, {"key": "f"}, None, [], [], overcluster="drop")
