"""Segment retrieval (HSG's kNN label transfer): majority labels, votes against a brute-force loop,
faiss against torch, segments and logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from usseg_core.errors import ConfigError
from usseg_core.retrieval import (K_DEFAULT, VOTE_DEFAULT, SegmentMemory, build_memory, dataset_grid,
                                  image_segments, retrieval_logits, retrieve, segment_labels)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_defaults_follow_hsg_code():
    assert (K_DEFAULT, VOTE_DEFAULT) == (20, "majority")
    assert dataset_grid("camvid11") == (6, 8) and dataset_grid("cityscapes27") == (12, 24)
    assert dataset_grid("synthetic") == (6, 6)
    with pytest.raises(ConfigError, match="unknown dataset 'voc'"):  # no silent default grid
        dataset_grid("voc")


def test_segment_labels_majority_with_ignore_pixels():
    seg = torch.tensor([[0, 0, 0, 1],
                        [0, 2, 2, 1],
                        [3, 3, 2, 1]])
    label = torch.tensor([[1, 1, -1, -1],
                          [2, -1, 0, -1],
                          [-1, -1, 0, 2]])
    # seg 0: labels 1, 1, (ign), 2 -> 1; seg 1: (ign), (ign), 2 -> 2; seg 2: (ign), 0, 0 -> 0;
    # seg 3: only ignore -> -1
    assert segment_labels(seg, label, n_classes=3, ignore=-1).tolist() == [1, 2, 0, -1]
    # a tie (one pixel of 0, one of 2) goes to the lowest class id; a custom ignore value
    tie = segment_labels(torch.tensor([0, 0, 0]), torch.tensor([2, 0, 255]), n_classes=3, ignore=255)
    assert tie.tolist() == [0]


def _unit(x):
    return F.normalize(torch.as_tensor(x, dtype=torch.float32), dim=-1)


def _brute(queries, protos, labels, n_classes, k, vote):
    out = torch.zeros(len(queries), n_classes)
    for q in range(len(queries)):
        sims = [float(queries[q] @ protos[s]) for s in range(len(protos))]
        nn = sorted(range(len(protos)), key=lambda s: -sims[s])[:k]
        for s in nn:
            out[q, labels[s]] += 1.0 if vote == "majority" else max(sims[s], 0.0)
        out[q] /= out[q].sum() if out[q].sum() > 0 else 1.0
    return out


def test_retrieve_on_a_2d_memory_matches_a_brute_force_loop():
    angles = torch.tensor([0.0, 0.3, 0.6, 1.6, 1.9, 3.0, 3.3, 4.5])  # radians on the unit circle
    protos = torch.stack([angles.cos(), angles.sin()], 1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    queries = _unit([[1.0, 0.1], [0.0, 1.0], [-1.0, 0.05], [0.2, -1.0]])
    for vote in ("majority", "weighted"):
        for k in (1, 3, 5):
            got = retrieve(queries, protos, labels, 3, k=k, vote=vote, backend="torch")
            assert torch.allclose(got, _brute(queries, protos, labels, 3, k, vote), atol=1e-6), (vote, k)
    # hand-computed: query at ~0.1 rad, k = 3 -> neighbours at 0.0, 0.3 (class 0) and 0.6 (class 1)
    got = retrieve(queries[:1], protos, labels, 3, k=3, backend="torch")
    assert torch.allclose(got, torch.tensor([[2 / 3, 1 / 3, 0.0]]))
    # k larger than the memory is clipped to it
    assert torch.allclose(retrieve(queries, protos, labels, 3, k=100, backend="torch"),
                          _brute(queries, protos, labels, 3, 8, "majority"))


def test_faiss_and_torch_backends_give_identical_votes():
    g = torch.Generator().manual_seed(0)
    protos = _unit(torch.randn(500, 16, generator=g))
    labels = torch.randint(0, 7, (500,), generator=g)
    queries = _unit(torch.randn(40, 16, generator=g))
    for vote in ("majority", "weighted"):
        a = retrieve(queries, protos, labels, 7, k=20, vote=vote, backend="torch")
        b = retrieve(queries, protos, labels, 7, k=20, vote=vote, backend="faiss")
        assert torch.equal(a, b), vote
    mem = SegmentMemory(protos, labels, 7, backend="faiss")
    assert torch.equal(mem.retrieve(queries), retrieve(queries, protos, labels, 7, backend="torch"))
    assert mem._index is not None  # built once, reused by the next call
    with pytest.raises(ValueError, match="vote"):
        retrieve(queries, protos, labels, 7, vote="softmax")


def _two_region_codes(H=12, W=16, D=4):
    codes = torch.zeros(D, H, W)
    codes[0, :, : W // 2] = 1.0  # left half points along e0, right half along e1
    codes[1, :, W // 2:] = 1.0
    return codes


def test_image_segments_cover_the_image_and_follow_regions():
    codes = _two_region_codes()
    seg = image_segments(codes, grid=(2, 2), iters=5, pool_to=(3, 4))
    assert seg.shape == (12, 16) and seg.dtype == torch.long
    assert seg.min() == 0 and sorted(seg.unique().tolist()) == list(range(int(seg.max()) + 1))
    # no segment straddles the two regions
    left, right = set(seg[:, :8].unique().tolist()), set(seg[:, 8:].unique().tolist())
    assert not left & right


def test_memory_then_logits_a_query_identical_to_a_prototype_gets_its_label():
    codes = _two_region_codes()
    label = torch.full((12, 16), -1)
    label[:, :8], label[:, 8:] = 3, 1
    label[0, 0] = 0  # a minority pixel does not change the majority
    protos, labels, image = build_memory([(codes[None], label)], n_classes=4, grid=(1, 2), iters=3,
                                         pool_to=(3, 4))
    assert protos.dtype == np.float32 and np.allclose(np.linalg.norm(protos, axis=1), 1.0)
    assert sorted(labels.tolist()) == [1, 3] and image.tolist() == [0, 0]
    memory = SegmentMemory(torch.from_numpy(protos), torch.from_numpy(labels), 4)
    logits = retrieval_logits(codes[None], memory, grid=(1, 2), iters=3, k=1, pool_to=(3, 4))
    assert logits.shape == (1, 4, 12, 16) and torch.isfinite(logits).all()
    pred = logits[0].argmax(0)
    assert (pred[:, :8] == 3).all() and (pred[:, 8:] == 1).all()
    # a segment that is only ignore pixels is not in the memory
    unlabelled = label.clone()
    unlabelled[:, 8:] = -1
    _, labels2, _ = build_memory([(codes, unlabelled)], n_classes=4, grid=(1, 2), iters=3)
    assert labels2.tolist() == [3]


def test_reference_memory_labels_count_ignore_as_a_class():
    """twke18/HSG's rule (find_majority_label_index + the drop of label 255) against ours, by hand."""
    seg = torch.tensor([[0, 0, 0, 1, 1],
                        [2, 2, 2, 2, 3]])
    label = torch.tensor([[1, -1, -1, 2, -1],
                          [0, 0, -1, -1, -1]])
    # seg 0: one 1, two ignore -> ours 1, reference drops it (ignore wins 2 : 1)
    # seg 1: one 2, one ignore -> both 2 (a tie with ignore keeps the class)
    # seg 2: two 0, two ignore -> both 0; seg 3: only ignore -> both drop it
    assert segment_labels(seg, label, 3).tolist() == [1, 2, 0, -1]
    assert segment_labels(seg, label, 3, rule="reference").tolist() == [-1, 2, 0, -1]
    with pytest.raises(ValueError, match="rule"):
        segment_labels(seg, label, 3, rule="majority")
    codes = _two_region_codes()
    lab = torch.full((12, 16), -1)
    lab[:, :8] = 3
    lab[:3, 8:] = 1  # the right segment: 24 pixels of class 1 among 96, the rest ignore
    _, ours, _ = build_memory([(codes, lab)], n_classes=4, grid=(1, 2), iters=3)
    _, ref, _ = build_memory([(codes, lab)], n_classes=4, grid=(1, 2), iters=3, labels="reference")
    assert sorted(ours.tolist()) == [1, 3] and ref.tolist() == [3]


def test_memory_key_moves_with_the_label_rule_only_when_set():
    from tasks.retrieval import memory_key

    feats, view = {"key": "features-key"}, {"policy": "center_crop", "resolution": 32}
    base = memory_key(None, feats, view, 3, (2, 2), 5)
    assert memory_key(None, feats, view, 3, (2, 2), 5, "valid-majority") == base  # the default is unkeyed
    assert "labels" not in base[1]
    assert memory_key(None, feats, view, 3, (2, 2), 5, "reference")[0] != base[0]


def test_pool_bins_are_adaptive_average_pooling():
    from usseg_core.retrieval import _pool_bins

    x = torch.randn(3, 29, 37)
    for out in [(5, 7), (29, 37), (4, 10), (1, 1)]:
        rows, cols = _pool_bins(29, out[0]), _pool_bins(37, out[1])
        mine = torch.einsum("oh,dhw,pw->dop", rows, x, cols) / (rows.sum(1)[:, None] * cols.sum(1)[None, :])
        torch.testing.assert_close(mine, F.adaptive_avg_pool2d(x[None], out)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["valid-majority", "reference"])
def test_segments_of_feature_codes_in_bands_equal_the_upsampled_map(rule):
    """Codes at feature resolution with the label's size, band by band (a band of one row, of four rows):
    the same segments, memory labels and retrieved labels as the codes upsampled in one piece, the
    prototypes equal up to float rounding."""
    from usseg_core.retrieval import retrieval_segments, segment_prototypes

    gen = torch.Generator().manual_seed(0)
    small = torch.randn(6, 5, 7, generator=gen)  # (D, h, w): a feature grid
    size = (41, 53)
    full = F.interpolate(small[None], size=size, mode="bilinear", align_corners=False)[0]
    label = torch.randint(-1, 4, size, generator=gen)
    want_seg, want_protos = segment_prototypes(full, (2, 3), 5, (5, 7))
    memory_want = build_memory([(full[None], label)], 4, (2, 3), 5, (5, 7), labels=rule)
    for band_bytes in (1, 4 * 6 * 53 * 4, 1 << 30):
        seg, protos = segment_prototypes(small, (2, 3), 5, (5, 7), size=size, band_bytes=band_bytes)
        assert seg.shape == size
        np.testing.assert_array_equal(seg.long().numpy(), want_seg.numpy())
        torch.testing.assert_close(protos, want_protos, rtol=1e-5, atol=1e-6)
        got = build_memory([(small[None], label)], 4, (2, 3), 5, (5, 7), labels=rule, band_bytes=band_bytes)
        np.testing.assert_array_equal(got[1], memory_want[1])
        np.testing.assert_array_equal(got[2], memory_want[2])
        np.testing.assert_allclose(got[0], memory_want[0], rtol=1e-5, atol=1e-6)
        memory = SegmentMemory(torch.from_numpy(got[0]), torch.from_numpy(got[1]), 4)
        seg, table = retrieval_segments(small[None], memory, (2, 3), 5, k=3, pool_to=(5, 7), size=size,
                                        band_bytes=band_bytes)
        want = retrieval_logits(full[None], memory, (2, 3), 5, k=3, pool_to=(5, 7))[0].argmax(0)
        np.testing.assert_array_equal(table[seg.long()].argmax(-1).numpy(), want.numpy())
