"""Linear-probe batches of a full-frame view over images of mixed sizes (directory datasets)."""
from __future__ import annotations

import numpy as np
import torch

import tasks.cluster as cluster
from usseg_core.heads import RawHead
from usseg_core.views import ViewSpec


class _Data:
    def __init__(self, labels):
        self.labels = labels

    def dataset(self):
        return self

    def load_label(self, id_):
        return self.labels[id_]


class _Manifest:
    def __init__(self, ids):
        self.ids = ids


def test_mixed_label_sizes_are_batched_by_shape(monkeypatch):
    shapes = [(8, 12), (8, 12), (10, 6), (8, 12), (8, 12), (8, 12)]
    labels = {f"im{i}": np.full(s, i % 3, dtype=np.int64) for i, s in enumerate(shapes)}
    feats = [np.full((5, 4, 4), float(i), dtype=np.float16) for i in range(len(shapes))]
    monkeypatch.setattr(cluster, "open_features", lambda infos: feats)
    monkeypatch.setattr(cluster, "load_manifest", lambda path: _Manifest(list(labels)))
    monkeypatch.setattr(cluster, "load_head", lambda path, device="cpu": RawHead())
    view = ViewSpec(policy="full", resolution=None, size=(32, 32))
    batches = list(cluster.labelled_code_batches(None, {"manifest": "m"}, _Data(labels), view, batch=2))
    # consecutive same-shape items share a batch of at most 2; every item appears once, in order
    assert [tuple(lab.shape) for _, lab in batches] == [(2, 8, 12), (1, 10, 6), (2, 8, 12), (1, 8, 12)]
    seen = np.concatenate([codes[:, 0, 0, 0].numpy() for codes, _ in batches])
    assert seen.tolist() == [0, 1, 2, 3, 4, 5]
    for codes, lab in batches:  # codes stay at feature resolution (the probe upsamples its K-channel logits)
        assert tuple(codes.shape[-2:]) == (4, 4) and lab.dtype == torch.int16
