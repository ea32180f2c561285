"""PiDiNet edge detector (Su et al., ICCV 2021, "Pixel Difference Networks for Efficient Edge Detection").

Written from the paper and the layer layout of the public release (hellozhuo/pidinet, commit
36f6506), so that its trained checkpoints `table5_pidinet.pth` / `table5_pidinet-tiny.pth` load with
strict key matching. Architecture ("carv4" with `--sa --dil`):

    init_block (pixel-difference conv 3->C)                                   full resolution
    stage 1: 3 PDC blocks (C)          -> x1                                  1
    stage 2: 4 PDC blocks (C->2C, /2)  -> x2                                  1/2
    stage 3: 4 PDC blocks (2C->4C, /2) -> x3                                  1/4
    stage 4: 4 PDC blocks (4C, /2)     -> x4                                  1/8
    side i: CDCM (dilations 5,7,9,11) -> CSAM (spatial attention) -> 1x1 conv -> bilinear up
    fused  : 1x1 conv over the 4 side maps; sigmoid

A PDC block is depthwise pixel-difference 3x3 conv -> ReLU -> pointwise 1x1 conv, plus a residual
(max-pool + 1x1 conv shortcut when it downsamples).

Pixel-difference convolutions. The checkpoint stores the *raw* 3x3 weights w of each difference
conv (the release's `convert_pidinet` would turn them into vanilla kernels, but these files were
saved before conversion: their `conv1.weight` are 3x3 for every layer, including the "rd" ones that
become 5x5). So we keep w as the parameter (same key names) and build the equivalent vanilla kernel
at run time (`pdc_kernel`); that is exact, cheap, and a single F.conv2d per layer:
  cd (central):  sum_i w_i (x_i - x_c)            -> w with centre tap reduced by sum(w)
  ad (angular):  sum_i w_i (x_i - x_{next(i)})    -> w - w permuted around the ring (next = clockwise)
  rd (radial):   sum_i w_i (x_{outer i} - x_{inner i}) on a 5x5 support -> +w on ring 2, -w on ring 1
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from usseg_core.edges.base import EdgeDetector, EdgeMap, resolve_weights
from usseg_core.edges.orientation import ridge_tangent
from usseg_core.errors import ConfigError, WeightsError
from usseg_core.store import file_sha256

# Layer 0 (init block) .. layer 15 (block4_4); Su et al. Table 5 / release config "carv4".
CARV4 = ("cd", "ad", "rd", "cv") * 4

# ImageNet statistics: the release's BSDS loader normalises RGB in [0, 1] with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# "ad" op: kernel[k] = w[k] - w[_AD_PREV[k]], i.e. y = sum_j w_j (x_j - x_{clockwise successor of j})
# (flat indices of a 3x3 kernel; the centre 4 maps to itself and so cancels).
_AD_PREV = (3, 0, 1, 6, 4, 2, 7, 8, 5)
# "rd": the 8 non-centre taps of the 3x3 weight go to the outer 5x5 ring (+) and inner ring (-).
_RD_OUTER = (0, 2, 4, 10, 14, 20, 22, 24)
_RD_INNER = (6, 7, 8, 11, 13, 16, 17, 18)
_RD_SRC = (0, 1, 2, 3, 5, 6, 7, 8)  # non-centre taps of the 3x3 weight, raster order


@dataclass
class PiDiNetConfig:
    """PiDiNet hyper-parameters (release defaults for the Table 5 models)."""

    width: int = 60  # C of stage 1: 60 for "pidinet", 20 for "pidinet-tiny" (release models/pidinet.py)
    dil: int = 24  # CDCM channels: 24 for pidinet, 8 for tiny (release `--dil`)
    sa: bool = True  # compact spatial attention on every side output (release `--sa`)
    pdcs: tuple[str, ...] = field(default=CARV4)  # pdc op per layer (release config "carv4")


VARIANTS = {
    "pidinet": PiDiNetConfig(width=60, dil=24),
    "pidinet-tiny": PiDiNetConfig(width=20, dil=8),
}


def pdc_kernel(op: str, w: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Vanilla kernel equivalent to the pixel-difference conv `op` with raw weights w (O, I, 3, 3).

    Returns (kernel, padding) for F.conv2d (dilation 1): 3x3 / pad 1, or 5x5 / pad 2 for "rd".
    """
    if op == "cv":
        return w, 1
    o, i = w.shape[:2]
    flat = w.reshape(o, i, 9)
    if op == "cd":
        k = flat.clone()
        k[:, :, 4] = k[:, :, 4] - flat.sum(-1)  # subtract (sum w) * x_centre
        return k.reshape(o, i, 3, 3), 1
    if op == "ad":
        return (flat - flat[:, :, list(_AD_PREV)]).reshape(o, i, 3, 3), 1
    if op == "rd":
        k = flat.new_zeros(o, i, 25)
        k[:, :, list(_RD_OUTER)] = flat[:, :, list(_RD_SRC)]
        k[:, :, list(_RD_INNER)] = -flat[:, :, list(_RD_SRC)]
        return k.reshape(o, i, 5, 5), 2
    raise ConfigError(f"unknown pixel-difference op {op!r}; known: cv, cd, ad, rd")


class PixelDifferenceConv(nn.Module):
    """3x3 pixel-difference convolution (stride 1, no bias) with raw weights as its parameter."""

    def __init__(self, op: str, in_ch: int, out_ch: int, groups: int = 1) -> None:
        super().__init__()
        pdc_kernel(op, torch.zeros(1, 1, 3, 3))  # validate op early
        self.op, self.groups = op, groups
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch // groups, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, pad = pdc_kernel(self.op, self.weight)
        return F.conv2d(x, k, padding=pad, groups=self.groups)


class PDCBlock(nn.Module):
    """Depthwise PDC 3x3 -> ReLU -> 1x1, residual; `stride=2` max-pools first and projects the skip."""

    def __init__(self, op: str, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        if stride > 1:
            self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
            self.shortcut = nn.Conv2d(in_ch, out_ch, kernel_size=1)
        self.conv1 = PixelDifferenceConv(op, in_ch, in_ch, groups=in_ch)
        self.conv2 = nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = self.pool(x)  # (B, Cin, H/2, W/2)
        y = self.conv2(F.relu(self.conv1(x)))  # (B, Cout, h, w)
        if self.stride > 1:
            x = self.shortcut(x)
        return y + x


class CDCM(nn.Module):
    """Compact dilation convolution module: ReLU, 1x1 to `out_ch`, sum of four dilated 3x3 convs."""

    def __init__(self, in_ch: int, out_ch: int, dilations: tuple[int, ...] = (5, 7, 9, 11)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=1)
        for n, d in enumerate(dilations, start=1):  # names conv2_1..conv2_4 match the checkpoint
            setattr(self, f"conv2_{n}", nn.Conv2d(out_ch, out_ch, 3, dilation=d, padding=d, bias=False))
        self.n = len(dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.relu(x))  # (B, dil, h, w)
        return sum(getattr(self, f"conv2_{n}")(x) for n in range(1, self.n + 1))


class CSAM(nn.Module):
    """Compact spatial attention: x * sigmoid(conv3x3(conv1x1(relu(x)))), 4 hidden channels."""

    def __init__(self, ch: int, hidden: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, hidden, kernel_size=1)
        self.conv2 = nn.Conv2d(hidden, 1, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv2(self.conv1(F.relu(x))))  # (B, C, h, w) * (B, 1, h, w)


class MapReduce(nn.Module):
    """1x1 conv to a single side-output logit map."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PiDiNet(nn.Module):
    """PiDiNet with CDCM + CSAM side branches; forward returns 4 side maps and the fused map."""

    def __init__(self, cfg: PiDiNetConfig) -> None:
        super().__init__()
        if len(cfg.pdcs) != 16:
            raise ConfigError(f"PiDiNet needs 16 pdc ops (one per layer), got {len(cfg.pdcs)}")
        c, p = cfg.width, cfg.pdcs
        self.init_block = PixelDifferenceConv(p[0], 3, c)
        plan = [  # (stage, n_blocks, in, out): stride 2 on the first block of stages 2-4
            (1, 3, c, c), (2, 4, c, 2 * c), (3, 4, 2 * c, 4 * c), (4, 4, 4 * c, 4 * c),
        ]
        layer = 1
        self.stages: list[list[str]] = []
        for stage, n, cin, cout in plan:
            names = []
            for b in range(1, n + 1):
                stride = 2 if (stage > 1 and b == 1) else 1
                name = f"block{stage}_{b}"
                setattr(self, name, PDCBlock(p[layer], cin if b == 1 else cout, cout, stride))
                names.append(name)
                layer += 1
            self.stages.append(names)
        fuse = [c, 2 * c, 4 * c, 4 * c]
        side = cfg.dil if cfg.dil else None
        self.dilations = nn.ModuleList([CDCM(f, side) for f in fuse]) if side else None
        red = [side or f for f in fuse]
        self.attentions = nn.ModuleList([CSAM(r) for r in red]) if cfg.sa else None
        self.conv_reduces = nn.ModuleList([MapReduce(r) for r in red])
        self.classifier = nn.Conv2d(4, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 3, H, W) ImageNet-normalised RGB -> [side1..side4, fused], each (B, 1, H, W) in [0, 1]."""
        h, w = x.shape[2:]
        x = self.init_block(x)  # (B, C, H, W)
        feats = []
        for names in self.stages:
            for name in names:
                x = getattr(self, name)(x)
            feats.append(x)  # (B, C|2C|4C|4C, H/2^k, W/2^k)
        sides = []
        for i, f in enumerate(feats):
            if self.dilations is not None:
                f = self.dilations[i](f)  # (B, dil, h_i, w_i)
            if self.attentions is not None:
                f = self.attentions[i](f)
            e = self.conv_reduces[i](f)  # (B, 1, h_i, w_i)
            sides.append(F.interpolate(e, (h, w), mode="bilinear", align_corners=False))
        fused = self.classifier(torch.cat(sides, dim=1))  # (B, 1, H, W)
        return [torch.sigmoid(s) for s in [*sides, fused]]


def load_pidinet(weights: str | Path, variant: str = "pidinet") -> PiDiNet:
    """Build `variant` and load a release checkpoint strictly (no missing / unexpected keys).

    Accepts `{'state_dict': ...}` files with or without the DataParallel `module.` prefix, or a bare
    state dict. Raises WeightsError naming the file on any mismatch.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"unknown PiDiNet variant {variant!r}; known: {', '.join(VARIANTS)}")
    path = Path(weights)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise WeightsError(f"{path}: cannot load as a PyTorch checkpoint ({exc})") from exc
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: expected a state dict or {{'state_dict': ...}}, got {type(ckpt)}")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    model = PiDiNet(VARIANTS[variant])
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: does not fit PiDiNet variant {variant!r}: {exc}") from exc
    return model.eval()


class PiDiNetDetector(EdgeDetector):
    """EdgeDetector wrapper: fused sigmoid map as strength, ridge tangent as orientation."""

    def __init__(self, variant: str, weights: str | Path, device: str = "cpu", orient_sigma: float = 2.0):
        self.name = variant
        self.device = torch.device(device)
        self.model = load_pidinet(weights, variant).to(self.device)
        self.orient_sigma = orient_sigma  # px; scale of the Hessian used for orientation
        self.fingerprint = f"{variant}-v1-{file_sha256(weights)[:16]}-os{orient_sigma:g}"

    @torch.no_grad()
    def predict(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) float32 fused edge probability."""
        x = torch.from_numpy(np.ascontiguousarray(image).copy()).to(self.device).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(3, 1, 1)
        x = ((x - mean) / std).unsqueeze(0)  # (1, 3, H, W)
        return self.model(x)[-1][0, 0].float().cpu().numpy()

    def detect(self, image: np.ndarray) -> EdgeMap:
        s = np.clip(self.predict(image), 0.0, 1.0).astype(np.float32)
        return EdgeMap(strength=s, orientation=ridge_tangent(s, self.orient_sigma))


_HINT = "table5_pidinet.pth / table5_pidinet-tiny.pth from hellozhuo/pidinet trained_models/"


def build_pidinet(weights=None, device="cpu") -> EdgeDetector:
    return PiDiNetDetector("pidinet", resolve_weights("pidinet", weights, _HINT), device)


def build_pidinet_tiny(weights=None, device="cpu") -> EdgeDetector:
    return PiDiNetDetector("pidinet-tiny", resolve_weights("pidinet-tiny", weights, _HINT), device)
