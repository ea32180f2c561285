"""The one predictor builder (tasks/predictors.py): per head, the predictors the evaluation used to build by
hand in flows/train.py, flows/evaluate_model.py and tasks/retrieval.py, field for field (their parameters
enter the evaluation key)."""
from __future__ import annotations

import pickle

from tasks.predictors import predictors_for, retrieval_predictor
from usseg_core.heads import get_head, list_heads

HEAD = {"key": "h", "path": "/s/head/h/head.pt"}
KMEANS = {"key": "k", "path": "/s/kmeans/k/centroids.npy"}
PROBE = {"key": "p", "path": "/s/linear-probe/p/probe.pt"}


def test_every_heads_predictors_in_table_order():
    for name in list_heads():
        spec = get_head(name)
        preds = predictors_for(spec, n_classes=5, head_ref=HEAD, kmeans=KMEANS, k=7, probe=PROBE)
        own = [{"name": spec.clusterer, "kind": "own", "label": spec.clusterer, "n_pred": 5, "key": "h"}]
        assert [p.params() for p in preds] == (own if spec.clusterer else []) + [
            {"name": "kmeans", "kind": "kmeans", "n_pred": 7, "key": "k"},
            {"name": "linear", "kind": "linear", "n_pred": 5, "key": "p", "n_classes": 5}], name
        assert [p.path for p in preds] == ([HEAD["path"]] if spec.clusterer else []) + [KMEANS["path"], PROBE["path"]]
        assert [p.row_label for p in preds] == ([spec.clusterer] if spec.clusterer else []) + ["kmeans", "linear"]


def test_missing_artifacts_are_left_out_and_the_raw_baseline():
    stego = get_head("stego")
    preds = predictors_for(stego, n_classes=5, head_ref=HEAD, kmeans=None, k=None, probe=None, head_classes=6)
    assert [(p.kind, p.n_pred) for p in preds] == [("own", 6)]
    (raw,) = predictors_for(None, n_classes=5, kmeans=KMEANS, k=7, kmeans_name="raw-kmeans")
    assert dict(raw) == {"name": "raw-kmeans", "kind": "kmeans", "n_pred": 7, "key": "k", "path": KMEANS["path"]}
    assert pickle.loads(pickle.dumps(raw)) == raw


def test_retrieval_predictor_fields():
    p = retrieval_predictor({"key": "m", "path": "/s/segment-memory/m", "pool_to": (4, 4)}, 3, (2, 2), 5, 7,
                            name="raw-retrieval")
    assert p.params() == {"name": "raw-retrieval", "kind": "retrieval", "label": "retrieval-k7", "n_pred": 3,
                          "n_classes": 3, "key": "m", "pool_to": [4, 4], "grid": [2, 2], "iters": 5, "k": 7,
                          "vote": "majority"}
    assert p.path == "/s/segment-memory/m"
