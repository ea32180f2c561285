"""Probes on head codes: the unsupervised cluster probe and the supervised linear probe.

Both train on **detached** codes, so they never shape the head ([code:STEGO] train_segmentation.py;
STEGO issues #20, #89). The cluster probe needs no labels. The linear probe is the only place in usseg
where ground-truth labels are used for fitting, and only to report the "linear" evaluation metric.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from usseg_core.bands import BAND_BYTES, band_rows, bilinear_band, bilinear_rows


class ClusterProbe(nn.Module):
    """K unit-norm learnable centroids scored by cosine similarity ([code:STEGO] ClusterLookup).

    Training it with Adam on ``loss`` is an online spherical k-means: each pixel pulls its arg-max
    centroid towards itself (the paper's "cosine mini-batch k-means").
    """

    def __init__(self, dim: int, n_clusters: int) -> None:
        super().__init__()
        self.dim, self.n_clusters = dim, n_clusters
        self.centroids = nn.Parameter(torch.randn(n_clusters, dim))  # normalised at use

    def cosine(self, codes: Tensor) -> Tensor:
        """(B, D, h, w) codes -> (B, K, h, w) cosine similarity to each centroid."""
        return torch.einsum("bdhw,kd->bkhw", F.normalize(codes, dim=1), F.normalize(self.centroids, dim=1))

    def forward(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (loss = −mean over pixels of the arg-max cosine, cosine logits (B, K, h, w))."""
        cos = self.cosine(codes)  # (B, K, h, w)
        # The arg-max assignment is a constant; the gradient reaches only the winning centroid (and codes).
        best = cos.max(dim=1).values  # (B, h, w)
        return -best.mean(), cos

    def logits(self, codes: Tensor, alpha: float = 2.0) -> Tensor:
        """Log soft-assignments log softmax(alpha · cosine), (B, K, h, w): the CRF unary ([code:STEGO] alpha 2)."""
        return torch.log_softmax(alpha * self.cosine(codes), dim=1)

    def predict(self, codes: Tensor) -> Tensor:
        """Hard cluster index per pixel, (B, D, h, w) -> (B, h, w) int64."""
        return self.cosine(codes).argmax(dim=1)


class LinearProbe(nn.Module):
    """1x1 conv D -> n_classes on detached codes, trained with cross-entropy on labels (evaluation only)."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.dim, self.n_classes = dim, n_classes
        self.conv = nn.Conv2d(dim, n_classes, kernel_size=1)

    def forward(self, codes: Tensor) -> Tensor:
        """(B, D, h, w) -> class logits (B, n_classes, h, w)."""
        return self.conv(codes)

    def loss(self, codes: Tensor, labels: Tensor, band_bytes: int = BAND_BYTES) -> Tensor:
        """Mean CE over labelled pixels; labels (B, H, W) int with −1 = ignore.

        Logits are bilinearly upsampled to the label size when it differs ([code:STEGO]): pass codes at
        feature resolution, the probe being a 1x1 conv, upsampling its K-channel logits equals the logits
        of upsampled codes up to float rounding (both are linear, the bilinear weights sum to 1). Logits
        of more than ``band_bytes`` at the label's size are upsampled and scored one band of rows at a
        time, each band recomputed in the backward pass (:func:`_banded_ce_sum`): no (B, K, H, W) map.
        Labels outside [0, n_classes) are ignored too; a batch with no labelled pixel gives a zero loss,
        not NaN.
        """
        logits = self(codes)  # (B, K, h, w)
        size = tuple(labels.shape[-2:])
        if logits.shape[-2:] != size and band_rows(*size, logits.shape[0] * logits.shape[1], band_bytes) < size[0]:
            return _banded_mean_ce(logits, labels, self.n_classes, band_bytes)
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        labels = _valid_labels(labels, self.n_classes)
        if not bool((labels >= 0).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels, ignore_index=-1)

    def predict(self, codes: Tensor) -> Tensor:
        """(B, D, h, w) -> (B, h, w) class index."""
        return self(codes).argmax(dim=1)


def _valid_labels(labels: Tensor, n_classes: int) -> Tensor:
    """Labels as long with every value outside [0, n_classes) set to -1 (ignored)."""
    labels = labels.long()
    return torch.where((labels >= 0) & (labels < n_classes), labels, torch.full_like(labels, -1))


def _banded_mean_ce(logits: Tensor, labels: Tensor, n_classes: int, band_bytes: int) -> Tensor:
    """:meth:`LinearProbe.loss` of (B, K, h, w) logits against (B, H, W) labels, band by band: the sum of
    each band's cross-entropy over the count of labelled pixels. Each band runs under activation
    checkpointing, so autograd keeps only the small logits and recomputes a band in the backward pass."""
    height, width = labels.shape[-2:]
    rows = bilinear_rows(logits.shape[-2], height, logits.device)
    step = band_rows(height, width, logits.shape[0] * logits.shape[1], band_bytes)
    total, count = logits.sum() * 0.0, 0
    for r0 in range(0, height, step):
        r1 = min(r0 + step, height)
        band = _valid_labels(labels[:, r0:r1], n_classes)  # (B, n, W)
        valid = int((band >= 0).sum())
        if valid:
            count += valid
            total = total + checkpoint(_band_ce_sum, logits, band, rows, r0, r1, use_reentrant=False)
    return total / max(count, 1)


def _band_ce_sum(logits: Tensor, labels: Tensor, rows: tuple, r0: int, r1: int) -> Tensor:
    band = bilinear_band(logits, rows, r0, r1, labels.shape[-1])  # (B, K, n, W)
    return F.cross_entropy(band, labels, ignore_index=-1, reduction="sum")


def train_linear_probe(codes_iter_factory: Callable[[], Iterable[tuple[Tensor, Tensor]]], n_classes: int, *,
                       epochs: int, lr: float = 5e-3, device: str | torch.device = "cpu",
                       seed: int = 0) -> LinearProbe:
    """Fit a LinearProbe on fixed codes (uses ground-truth labels: evaluation protocol only).

    Args:
        codes_iter_factory: called once per epoch; yields (codes (B, D, h, w), labels (B, H, W), −1 = ignore).
            Codes are detached here whatever the caller passes.
        n_classes: number of label classes.
        epochs: passes over the factory's batches.
        lr: Adam learning rate ([code:STEGO] probes: Adam 5e-3).
        seed: initialisation seed (the global torch RNG is left untouched).
    Returns:
        the trained probe, in eval mode, on ``device``.
    """
    device = torch.device(device)
    probe: LinearProbe | None = None
    opt: torch.optim.Optimizer | None = None
    for _ in range(epochs):
        for codes, labels in codes_iter_factory():
            codes = torch.as_tensor(codes).detach().to(device, torch.float32)
            labels = torch.as_tensor(labels).to(device)
            if probe is None:  # D is known only from the first batch
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    probe = LinearProbe(codes.shape[1], n_classes)
                probe = probe.to(device)
                opt = torch.optim.Adam(probe.parameters(), lr=lr)
            loss = probe.loss(codes, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if probe is None:
        raise ValueError("train_linear_probe: codes_iter_factory yielded no batch")
    return probe.eval()
