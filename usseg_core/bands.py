"""Bilinear upsampling one band of rows at a time: a (C, H, W) map at an image's size never exists whole.

Evaluation and segmentation (``tasks.evaluate``) upsample feature-resolution codes and the dense CRF's
marginals to the label's size with it; the linear probe's loss (``usseg_core.heads.probes``) its logits.
docs/architecture.md, Evaluation.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

# Bytes of one band's upsampled D-channel codes (float32): the most a band of rows holds of them (472 raw
# EfficientNet channels x 6000 columns: 5 rows a band). Below it an image is upsampled in one piece.
BAND_BYTES = 64 << 20


def bilinear_rows(in_h: int, out_h: int, device: torch.device | str = "cpu"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two source rows and weights of every output row of a bilinear upsampling (align_corners=False)
    from ``in_h`` to ``out_h`` rows: i0, i1 (H,) long, w0, w1 (H, 1) float32 on ``device``.

    Read off ``F.interpolate`` itself (source row k is channel k of an identity), so the weights are its
    own to the bit rather than a re-derivation of its float32 index arithmetic."""
    eye = torch.eye(in_h)[None, :, :, None]  # (1, h, h, 1): channel k holds source row k alone
    wt = F.interpolate(eye, size=(out_h, 1), mode="bilinear", align_corners=False)[0, :, :, 0]  # (h, H)
    used = wt != 0
    rows = torch.arange(in_h)[:, None]
    i0 = torch.where(used, rows, in_h).amin(0).clamp_max(in_h - 1)  # lambda0 = 1 - lambda1 > 0: always used
    i1 = torch.where(used, rows, -1).amax(0).clamp_min(i0)  # i0 again where the second weight is 0
    cols = torch.arange(out_h)
    w1 = torch.where(i1 > i0, wt[i1, cols], torch.zeros(out_h))
    return i0, i1, wt[i0, cols].to(device)[:, None], w1.to(device)[:, None]


def band_rows(height: int, width: int, channels: int, band_bytes: int = BAND_BYTES) -> int:
    """Rows per band so that one band of ``channels`` float32 maps of ``width`` columns holds at most
    ``band_bytes`` (at least one row)."""
    return max(1, min(height, band_bytes // (4 * channels * width)))


@torch.no_grad()
def upsampled_bands(codes: torch.Tensor, size: tuple[int, int], band_bytes: int = BAND_BYTES
                    ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``F.interpolate(codes, size, mode="bilinear", align_corners=False)`` one band of rows at a time.

    Yields (r0, r1, (1, D, r1 - r0, W)) covering rows [0, H). An output that fits in ``band_bytes`` is
    that one call. Otherwise each band blends the two source rows of each of its output rows with the
    interpolation's own row weights (:func:`bilinear_rows`), at feature width, then upsamples the blend
    along the width alone: the same values as the full call up to float rounding (a few units in the last
    place: the kernel sums in another order), never a (D, H, W) map, and no slower than the one call."""
    height, width = size
    step = band_rows(height, width, codes.shape[1], band_bytes)
    if step >= height:
        yield 0, height, F.interpolate(codes, size=size, mode="bilinear", align_corners=False)
        return
    i0, i1, w0, w1 = bilinear_rows(codes.shape[-2], height, codes.device)
    for r0 in range(0, height, step):
        r1 = min(r0 + step, height)
        yield r0, r1, bilinear_band(codes, (i0, i1, w0, w1), r0, r1, width)


def bilinear_band(x: torch.Tensor, rows: tuple, r0: int, r1: int, width: int) -> torch.Tensor:
    """Rows [r0, r1) of ``x`` (B, C, h, w) upsampled bilinearly to ``width`` columns and the height that
    ``rows`` (:func:`bilinear_rows`, weights (H, 1) on ``x``'s device) was made for: (B, C, r1 - r0, width).
    Differentiable (the linear probe's loss runs it under autograd)."""
    i0, i1, w0, w1 = rows
    blend = x[:, :, i0[r0:r1]] * w0[r0:r1] + x[:, :, i1[r0:r1]] * w1[r0:r1]  # (B, C, n, w)
    return F.interpolate(blend, size=(r1 - r0, width), mode="bilinear", align_corners=False)


