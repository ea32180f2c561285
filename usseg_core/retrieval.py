"""Segment retrieval: HSG's evaluation protocol (kNN label transfer), docs/methods/hsg.md §1.3, for any codes.

A *labelled memory* holds the segment prototypes of a labelled split with their majority ground-truth
label. A test image is cut into per-image spherical k-means segments (the same test-time n0 grid as the
memory), every segment's prototype retrieves its k most cosine-similar memory prototypes, and their
labels vote. Predictions are class ids: no Hungarian matching.

Where HSG / SegSort leave a choice, this is what the reference code does and what we do:

- k = 20, majority vote: ``twke18/HSG`` ``hsg/models/predictions/segsort.py`` (``predictions``, the
  predictor ``pyscripts/inference/inference.py`` builds) retrieves the top 20 memory prototypes by dot
  product of unit prototypes and takes the argmax of the label counts
  (``hsg/utils/segsort/eval.py`` ``majority_label_from_topk``). SegSort (``jyhjinghwang/SegSort``,
  ``bashscripts/voc12/train_segsort.sh``) uses the same rule with ``K_IN_NEAREST_NEIGHBORS=15`` (21 in
  the multi-GPU script). Ties go to the lowest class id (``argmax`` returns the first maximum in both).
- "weighted" is ours, not in either repo: each neighbour votes with its cosine similarity clamped at 0
  (no temperature to choose; a dissimilar neighbour never votes *against* a class).
- Memory segments: the memory images are clustered with the test-time grid (HSG's ``bashscripts``
  pass the same ``--kmeans_num_clusters`` to ``prototype.py`` and ``inference.py``). Two rules label
  them (``MEMORY_LABELS``, :func:`segment_labels`): "valid-majority" (ours, the default): the majority
  among a segment's *valid* pixels, segments without one dropped, so a segment that is mostly ignore
  but has some labelled pixels is kept; "reference": HSG's ``find_majority_label_index``
  (``hsg/utils/segsort/common.py:221-267``) takes the majority over *all* pixels with the ignore value
  255 as a class of its own (the highest id, so a tie goes to the real class), and
  ``pyscripts/inference/inference.py:96-106`` then drops the segments whose majority is 255.

Deliberate difference: HSG clusters the full-resolution (upsampled) embedding. :func:`image_segments`
runs k-means on the codes average-pooled back to about the feature resolution (the upsampled codes are
a bilinear interpolation of that grid, so pooling loses little) and then assigns every full-resolution
pixel to its nearest centroid in one matmul: the k-means costs ``iters`` passes over h*w instead of
H*W pixels, the segment boundaries still sit at label resolution.

Memory: given feature-resolution codes and the label's ``size``, :func:`segment_prototypes` upsamples
them one band of rows at a time (``usseg_core.bands``) when the (D, H, W) map would pass ``band_bytes``:
a pass for the pooled k-means input, a pass for each pixel's segment and the segment sums, giving the
same segments and, up to float rounding, the same prototypes as the map in one piece (which is what runs
below the budget, to the bit as before).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from usseg_core.bands import BAND_BYTES, band_rows, upsampled_bands
from usseg_core.spec import RETRIEVAL_K, RETRIEVAL_VOTES
from usseg_core.datasets.protocol import RETRIEVAL_LABELS
from usseg_core.datasets.registry import dataset_protocol
from usseg_core.segsort import compact_ids, grid_kmeans, segment_means

__all__ = ["K_DEFAULT", "VOTE_DEFAULT", "VOTES", "MEMORY_LABELS", "check_options", "SegmentMemory", "segment_labels",
           "image_segments", "segment_prototypes", "build_memory", "retrieve", "retrieval_logits", "retrieval_segments",
           "dataset_grid"]

K_DEFAULT = RETRIEVAL_K  # twke18/HSG: 20 (the run option's default, written in usseg_core/spec.py)
VOTE_DEFAULT = RETRIEVAL_VOTES[0]  # "majority": twke18/HSG hsg/utils/segsort/eval.py majority_label_from_topk
KMEANS_ITERS = 15  # HSG: 15 k-means iterations (docs/methods/protocol.md S6 b)
LOG_EPS = 1e-4  # floor of the vote distribution before the log: finite unaries for the dense CRF
FAISS_MIN_MEMORY = 50_000  # "auto" backend: faiss IndexFlatIP from this many memory prototypes on
COUNT_PIXELS = 1 << 20  # pixels per chunk of segment_labels' int64 counting: its temporaries stay small
# how memory segments get their label (module docstring): ours first (the default), then twke18/HSG's
MEMORY_LABELS = RETRIEVAL_LABELS  # defined torch-free, beside the dataset protocols that choose one


def dataset_grid(dataset: str) -> tuple[int, int]:
    """The test-time n0 grid a registered dataset declares (``protocol.hsg_test_grid``; "cityscapes27" -> 12 x 24).

    Raises:
        ConfigError: unknown dataset.
    """
    return dataset_protocol(dataset).hsg_test_grid


# --- votes: (Q, k) similarities and labels of the neighbours -> (Q, C) distribution ------------------

def _majority(sims: Tensor, labels: Tensor, n_classes: int) -> Tensor:
    votes = F.one_hot(labels, n_classes).sum(1).to(torch.float32)  # (Q, C)
    return votes / labels.shape[1]


def _weighted(sims: Tensor, labels: Tensor, n_classes: int) -> Tensor:
    w = sims.clamp_min(0).to(torch.float32)  # (Q, k)
    votes = torch.zeros(labels.shape[0], n_classes, dtype=torch.float32).scatter_add_(1, labels, w)
    return votes / votes.sum(1, keepdim=True).clamp_min(1e-12)  # a row of zeros stays zeros


VOTES: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {"majority": _majority, "weighted": _weighted}


def check_options(k: int = K_DEFAULT, vote: str = VOTE_DEFAULT) -> None:
    """ValueError unless ``vote`` is a known rule and ``k`` >= 1 (the one check of both options)."""
    if vote not in VOTES:
        raise ValueError(f"vote must be one of {sorted(VOTES)}, got {vote!r}")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")


# --- nearest neighbours -----------------------------------------------------------------------------

def _faiss_index(protos: Tensor):
    import faiss

    index = faiss.IndexFlatIP(protos.shape[1])
    index.add(np.ascontiguousarray(protos.numpy(), dtype=np.float32))
    return index


def _topk_indices(queries: Tensor, protos: Tensor, k: int, backend: str, index=None) -> Tensor:
    """(Q, k) long indices of the k largest inner products per query (order within the k irrelevant)."""
    if backend == "auto":
        backend = "faiss" if index is not None or protos.shape[0] >= FAISS_MIN_MEMORY else "torch"
    if backend == "torch":
        return (queries @ protos.T).topk(k, dim=1).indices  # (Q, k)
    if backend == "faiss":
        index = index if index is not None else _faiss_index(protos)
        _, idx = index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), k)
        return torch.from_numpy(idx).long()
    raise ValueError(f"backend must be 'auto', 'torch' or 'faiss', got {backend!r}")


@torch.no_grad()
def retrieve(queries: Tensor, protos: Tensor, labels: Tensor, n_classes: int, k: int = K_DEFAULT,
             vote: str = VOTE_DEFAULT, backend: str = "auto", index=None) -> Tensor:
    """Vote distribution (Q, n_classes) of each query's k cosine-nearest memory prototypes.

    Args:
        queries: (Q, D) unit float32 segment prototypes.
        protos, labels: the memory, (S, D) unit float32 and (S,) long in [0, n_classes).
        k: neighbours per query (clipped to S).
        vote: "majority" (fraction of the k labels per class, HSG) or "weighted" (cosine similarities
            clamped at 0, normalised per query).
        backend: "torch" (matmul + topk), "faiss" (``IndexFlatIP``; ``index`` reuses a built one) or
            "auto" (faiss for memories of ``FAISS_MIN_MEMORY`` prototypes or more). Both give the same
            neighbours; the similarities that weight the votes are recomputed from the indices by the
            same code for either backend, so the distributions are identical.
    """
    check_options(k, vote)
    queries, protos = queries.float().cpu(), protos.float().cpu()
    k = min(k, protos.shape[0])
    idx = _topk_indices(queries, protos, k, backend, index)  # (Q, k)
    sims = torch.einsum("qd,qkd->qk", queries, protos[idx])  # (Q, k)
    return VOTES[vote](sims, labels.long().cpu()[idx], n_classes)


@dataclass
class SegmentMemory:
    """A labelled memory: unit prototypes (S, D) float32 and their labels (S,) long."""

    prototypes: Tensor
    labels: Tensor
    n_classes: int
    backend: str = "auto"
    _index: object = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.prototypes.shape[0])

    def retrieve(self, queries: Tensor, k: int = K_DEFAULT, vote: str = VOTE_DEFAULT) -> Tensor:
        """:func:`retrieve` against this memory; a faiss index is built once and kept."""
        use_faiss = self.backend == "faiss" or (self.backend == "auto" and len(self) >= FAISS_MIN_MEMORY)
        if use_faiss and self._index is None:
            self._index = _faiss_index(self.prototypes.float())
        return retrieve(queries, self.prototypes, self.labels, self.n_classes, k, vote,
                        backend="faiss" if use_faiss else "torch", index=self._index)


# --- segments ---------------------------------------------------------------------------------------

def segment_labels(seg: Tensor, label: Tensor, n_classes: int, ignore: int = -1,
                   rule: str = MEMORY_LABELS[0]) -> Tensor:
    """Majority ground-truth label of every segment id in [0, seg.max()] -> (S,) long.

    ``seg`` (H, W) long (-1 = no segment), ``label`` (H, W) int. Ties go to the lowest class id.
    ``rule="valid-majority"``: pixels labelled ``ignore`` do not vote; a segment with no valid pixel gets -1.
    ``rule="reference"`` (twke18/HSG): the ignore pixels vote as one more class after the real ones; a
    segment whose majority is that class gets -1 (a tie between a class and ignore keeps the class).
    """
    if rule not in MEMORY_LABELS:
        raise ValueError(f"rule must be one of {MEMORY_LABELS}, got {rule!r}")
    seg, label = seg.reshape(-1), label.reshape(-1)
    n_seg = int(seg.max()) + 1 if seg.numel() else 0
    counts = torch.zeros(n_seg * n_classes, dtype=torch.long)
    ignored = torch.zeros(n_seg, dtype=torch.long)
    for a in range(0, seg.numel(), COUNT_PIXELS):  # integer counts: the same sums in any order
        s, lab = seg[a:a + COUNT_PIXELS].long(), label[a:a + COUNT_PIXELS].long()
        valid = (s >= 0) & (lab != ignore)
        counts += torch.bincount(s[valid] * n_classes + lab[valid], minlength=n_seg * n_classes)
        if rule == "reference":
            ignored += torch.bincount(s[(s >= 0) & (lab == ignore)], minlength=n_seg)  # (S,)
    counts = counts.reshape(n_seg, n_classes)  # (S, C)
    best, arg = counts.amax(1), counts.argmax(1)  # (S,): argmax returns the first maximum
    keep = best > 0
    if rule == "reference":
        keep &= best >= ignored
    return torch.where(keep, arg, torch.full((n_seg,), -1, dtype=torch.long))


def _segments_of_unit(x: Tensor, grid: tuple[int, int], iters: int, pool_to: tuple[int, int] | None) -> Tensor:
    # x (D, H, W) unit codes -> (H, W) contiguous segment ids
    small = x[None] if pool_to is None else F.normalize(F.adaptive_avg_pool2d(x[None], tuple(pool_to)), dim=1)
    _, cents, counts = grid_kmeans(small, tuple(grid), iters)  # (1, K, D), (1, K)
    sims = cents[0] @ x.flatten(1)  # (K, H*W)
    sims = sims.masked_fill((counts[0] == 0)[:, None], float("-inf"))  # emptied clusters take no pixel
    seg, _ = compact_ids(sims.argmax(0))
    return seg.reshape(x.shape[1:])


@torch.no_grad()
def image_segments(codes: Tensor, grid: tuple[int, int], iters: int = KMEANS_ITERS,
                   pool_to: tuple[int, int] | None = None) -> Tensor:
    """Per-image spherical k-means segments of ``codes`` (D, H, W) -> (H, W) long ids in [0, S).

    K-means (grid initialisation, K = gh * gw) runs on the codes average-pooled to ``pool_to`` (about
    the feature resolution; None = no pooling) and renormalised; every full-resolution pixel then takes
    its nearest live centroid (see the module docstring). Ids are made contiguous (empty clusters
    dropped). ``codes`` need not be unit norm: they are normalised here.
    """
    return _segments_of_unit(F.normalize(codes.float(), dim=0), grid, iters, pool_to)


@torch.no_grad()
def segment_prototypes(codes: Tensor, grid: tuple[int, int], iters: int = KMEANS_ITERS,
                       pool_to: tuple[int, int] | None = None, size: tuple[int, int] | None = None,
                       band_bytes: int = BAND_BYTES) -> tuple[Tensor, Tensor]:
    """:func:`image_segments` of ``codes`` (D, H, W) and their unit mean codes -> seg (H, W), (S, D).

    With ``size``, ``codes`` (D, h, w) are first upsampled bilinearly to ``size`` (H, W): in one piece
    when that map holds at most ``band_bytes`` (or ``pool_to`` is None), else band by band
    (:func:`_banded_segment_prototypes`; seg is then int16, int32 past 32767 clusters)."""
    if size is not None and tuple(size) != tuple(codes.shape[-2:]):
        if pool_to is not None and band_rows(*size, codes.shape[0], band_bytes) < size[0]:
            return _banded_segment_prototypes(codes, tuple(size), grid, iters, tuple(pool_to), band_bytes)
        codes = F.interpolate(codes[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]
    x = F.normalize(codes.float(), dim=0)  # (D, H, W), normalised once for both steps
    seg = _segments_of_unit(x, grid, iters, pool_to)
    protos, _ = segment_means(x.flatten(1).T, seg.reshape(-1), int(seg.max()) + 1)  # (S, D)
    return seg, protos


def _pool_bins(n: int, out: int) -> Tensor:
    """(out, n) float32 0/1: input index j is in ``adaptive_avg_pool``'s bin i, [floor(i n / out),
    ceil((i + 1) n / out))."""
    i = torch.arange(out)[:, None]
    j = torch.arange(n)[None, :]
    return ((j >= (i * n) // out) & (j < -((-(i + 1) * n) // out))).float()


def _unit_bands(codes: Tensor, size: tuple[int, int], band_bytes: int):
    # (r0, r1, (D, n, W) unit codes of rows [r0, r1) of codes (D, h, w) upsampled to size)
    for r0, r1, band in upsampled_bands(codes[None].float(), size, band_bytes):
        yield r0, r1, F.normalize(band[0], dim=0)


def _banded_segment_prototypes(codes: Tensor, size: tuple[int, int], grid: tuple[int, int], iters: int,
                               pool_to: tuple[int, int], band_bytes: int) -> tuple[Tensor, Tensor]:
    """:func:`segment_prototypes` of ``codes`` (D, h, w) upsampled to ``size``, one band of rows at a
    time: the adaptive average pool as sums over each band's rows and columns, then each pixel's nearest
    live centroid and the segment sums; ids made contiguous in increasing order as ``compact_ids`` does."""
    (height, width), dim = size, codes.shape[0]
    rows, cols = _pool_bins(height, pool_to[0]), _pool_bins(width, pool_to[1])  # (ph, H), (pw, W)
    pooled = torch.zeros(dim, *pool_to)
    for r0, r1, x in _unit_bands(codes, size, band_bytes):
        pooled += torch.einsum("on,dnp->dop", rows[:, r0:r1], x @ cols.T)  # (D, ph, pw) sums
    pooled /= rows.sum(1)[:, None] * cols.sum(1)[None, :]
    _, cents, counts = grid_kmeans(F.normalize(pooled[None], dim=1), tuple(grid), iters)  # (1, K, D), (1, K)
    n_clusters = cents.shape[1]
    raw = torch.empty(size, dtype=torch.int16 if n_clusters < 2 ** 15 else torch.int32)
    sums, sizes = torch.zeros(n_clusters, dim), torch.zeros(n_clusters, dtype=torch.long)
    for r0, r1, x in _unit_bands(codes, size, band_bytes):
        sims = cents[0] @ x.flatten(1)  # (K, n*W)
        ids = sims.masked_fill((counts[0] == 0)[:, None], float("-inf")).argmax(0)  # (n*W,)
        raw[r0:r1] = ids.reshape(r1 - r0, width)
        sums.index_add_(0, ids, x.flatten(1).T)
        sizes += torch.bincount(ids, minlength=n_clusters)
    used = sizes > 0
    new_id = (torch.cumsum(used, 0) - 1).to(raw.dtype)  # (K,): contiguous ids of the used clusters
    step = max(1, COUNT_PIXELS // width)
    for r0 in range(0, height, step):  # each row relabelled once, through an int64 index of one chunk
        raw[r0:r0 + step] = new_id[raw[r0:r0 + step].long()]
    return raw, F.normalize(sums[used], dim=-1)


@torch.no_grad()
def build_memory(items: Iterable[tuple[Tensor, Tensor]], n_classes: int, grid: tuple[int, int],
                 iters: int = KMEANS_ITERS, pool_to: tuple[int, int] | None = None,
                 ignore: int = -1, labels: str = MEMORY_LABELS[0],
                 band_bytes: int = BAND_BYTES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The labelled memory of a split from its per-image (codes (1, D, h, w) or (D, h, w), label (H, W)).

    Codes at another size than the label's (feature resolution) are upsampled to it by
    :func:`segment_prototypes` (band by band past ``band_bytes``). Every image is cut by :func:`image_segments` (the test-time grid, as HSG's ``prototype.py``), each
    segment gives its unit mean code and its majority label (:func:`segment_labels` under the rule
    ``labels``, one of ``MEMORY_LABELS``); segments without a label are dropped. Returns prototypes
    (S, D) float32 unit, labels (S,) int64 and the index of the image each prototype comes from (S,) int64.
    """
    rule = labels
    protos, out_labels, image = [], [], []
    for i, (codes, label) in enumerate(items):
        codes = codes[0] if codes.dim() == 4 else codes
        seg, segment_protos = segment_prototypes(codes, grid, iters, pool_to, size=tuple(label.shape[-2:]),
                                                 band_bytes=band_bytes)
        lab = segment_labels(seg, torch.as_tensor(label), n_classes, ignore, rule)
        keep = lab >= 0
        protos.append(segment_protos[keep])
        out_labels.append(lab[keep])
        image.append(torch.full((int(keep.sum()),), i, dtype=torch.long))
    if not protos:
        raise ValueError("build_memory: no labelled images")
    return (torch.cat(protos).numpy().astype(np.float32), torch.cat(out_labels).numpy().astype(np.int64),
            torch.cat(image).numpy().astype(np.int64))


@torch.no_grad()
def retrieval_logits(codes: Tensor, memory: SegmentMemory, grid: tuple[int, int], iters: int = KMEANS_ITERS,
                     k: int = K_DEFAULT, vote: str = VOTE_DEFAULT,
                     pool_to: tuple[int, int] | None = None) -> Tensor:
    """(1, n_classes, H, W) log vote distribution of each pixel's segment, from codes (1, D, H, W).

    The distribution is floored at ``LOG_EPS`` before the log so a dense CRF gets finite unaries; its
    argmax is the retrieved label (class ids: score without matching).
    """
    seg, logits = retrieval_segments(codes, memory, grid, iters, k, vote, pool_to)  # (H, W), (S, C)
    return logits[seg.long()].permute(2, 0, 1)[None]  # (1, C, H, W)


@torch.no_grad()
def retrieval_segments(codes: Tensor, memory: SegmentMemory, grid: tuple[int, int], iters: int = KMEANS_ITERS,
                       k: int = K_DEFAULT, vote: str = VOTE_DEFAULT, pool_to: tuple[int, int] | None = None,
                       size: tuple[int, int] | None = None, band_bytes: int = BAND_BYTES) -> tuple[Tensor, Tensor]:
    """:func:`retrieval_logits` as each pixel's segment (H, W) and each segment's log vote distribution
    (S, n_classes): ``logits[seg]`` is the map, which a caller can take one band at a time. ``codes``
    (1, D, h, w) are upsampled to ``size`` first when given (:func:`segment_prototypes`)."""
    seg, protos = segment_prototypes(codes[0], grid, iters, pool_to, size=size, band_bytes=band_bytes)
    dist = memory.retrieve(protos, k, vote)  # (S, C)
    return seg, torch.log(dist + LOG_EPS)
