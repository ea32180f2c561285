"""Raw label value -> training class id mappings, exactly as docs/references.md §2.

A :class:`LabelMapping` is a lookup table over raw values. Every raw value is either mapped to a class
id in ``[0, n_classes)``, mapped to ``-1`` (ignore), or *invalid*: an invalid value raises an
InputError naming the label file instead of being silently folded into some class (STEGO's Potsdam
loader starts from zeros, so unknown values become class 0 — docs/references.md §2.3 — which we avoid).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from usseg_core.errors import InputError

IGNORE = -1
_INVALID = -2  # sentinel inside lookup tables; never returned

# ---------------------------------------------------------------- COCO-Stuff 182 -> 27 (REFERENCES §2.1)
COCOSTUFF27_CLASS_NAMES: tuple[str, ...] = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal",
    "outdoor", "person", "sports", "vehicle",  # 0-11: thing super-categories
    "ceiling", "floor", "food", "furniture", "rawmaterial", "textile", "wall", "window", "building",
    "ground", "plant", "sky", "solid", "structural", "water",  # 12-26: stuff super-categories
)

# Fine stuffthingmaps value (COCO-Stuff id - 1) -> coarse id; index = fine value 0..181.
COCOSTUFF_FINE_TO_COARSE: tuple[int, ...] = (
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8,  # 0-9: person, bicycle..boat, traffic light
    8, 8, 8, 8, 8, 7, 7, 7, 7, 7,  # 10-19: fire hydrant..bench, bird..sheep
    7, 7, 7, 7, 7, 6, 6, 6, 6, 6,  # 20-29: cow..giraffe, hat..handbag
    6, 6, 6, 10, 10, 10, 10, 10, 10, 10,  # 30-39: tie, suitcase, frisbee..baseball bat
    10, 10, 10, 5, 5, 5, 5, 5, 5, 5,  # 40-49: baseball glove..tennis racket, bottle..spoon
    5, 2, 2, 2, 2, 2, 2, 2, 2, 2,  # 50-59: bowl, banana..donut
    2, 3, 3, 3, 3, 3, 3, 3, 3, 3,  # 60-69: cake, chair..toilet
    3, 0, 0, 0, 0, 0, 0, 1, 1, 1,  # 70-79: door, tv..cell phone, microwave..toaster
    1, 1, 1, 4, 4, 4, 4, 4, 4, 4,  # 80-89: sink..blender, book..toothbrush
    4, 17, 17, 22, 20, 20, 22, 15, 25, 16,  # 90-99: hair brush, banner, blanket, branch, bridge, building-other, bush, cabinet, cage, cardboard
    13, 12, 12, 17, 17, 23, 15, 15, 17, 15,  # 100-109: carpet, ceiling-other, ceiling-tile, cloth, clothes, clouds, counter, cupboard, curtain, desk-stuff
    21, 15, 25, 13, 13, 13, 13, 13, 22, 26,  # 110-119: dirt, door-stuff, fence, floor-*, flower, fog
    14, 14, 15, 22, 21, 21, 24, 20, 22, 15,  # 120-129: food-other, fruit, furniture-other, grass, gravel, ground-other, hill, house, leaves, light
    17, 16, 15, 22, 24, 21, 17, 25, 16, 21,  # 130-139: mat, metal, mirror-stuff, moss, mountain, mud, napkin, net, paper, pavement
    17, 22, 16, 21, 21, 25, 21, 26, 21, 24,  # 140-149: pillow, plant-other, plastic, platform, playingfield, railing, railroad, river, road, rock
    20, 17, 14, 21, 26, 15, 23, 20, 21, 24,  # 150-159: roof, rug, salad, sand, sea, shelf, sky-other, skyscraper, snow, solid-other
    15, 24, 22, 25, 15, 20, 17, 17, 22, 14,  # 160-169: stairs, stone, straw, structural-other, table, tent, textile-other, towel, tree, vegetable
    18, 18, 18, 18, 18, 18, 18, 26, 26, 19,  # 170-179: wall-*, water-other, waterdrops, window-blind
    19, 24,  # 180-181: window-other, wood
)

# ---------------------------------------------------------------- Cityscapes labelIds - 7 (REFERENCES §2.2)
CITYSCAPES27_CLASS_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge",
    "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky",
    "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)

# ---------------------------------------------------------------- Potsdam 6 -> 3 (REFERENCES §2.3)
POTSDAM3_CLASS_NAMES: tuple[str, ...] = ("roads and cars", "buildings and clutter", "trees and vegetation")
# IIC fine order: 0 roads, 1 building, 2 low vegetation, 3 tree, 4 car, 5 clutter.
POTSDAM_FINE_TO_COARSE: dict[int, int] = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}

# ---------------------------------------------------------------- CamVid 11 (SegNet release; data README)
CAMVID11_CLASS_NAMES: tuple[str, ...] = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign/symbol", "fence", "car", "pedestrian",
    "bicyclist",
)


@dataclass(frozen=True)
class LabelMapping:
    """A raw-value lookup table. ``table[v]`` is the class id of raw value ``v`` (-1 = ignore).

    Attributes:
        name: mapping name used in error messages (e.g. "cocostuff27").
        table: (V,) int64 lookup table; entries equal to the internal invalid sentinel are rejected.
        n_classes: number of classes; every valid entry is in [-1, n_classes).
    """

    name: str
    table: np.ndarray
    n_classes: int

    def apply(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        """Map a raw (H, W) label to class ids; raise InputError naming ``path`` on unknown values."""
        raw = np.asarray(raw)
        if raw.size == 0:
            return raw.astype(np.int64)
        lo, hi = int(raw.min()), int(raw.max())
        if lo < 0 or hi >= len(self.table):
            bad = np.unique(raw[(raw < 0) | (raw >= len(self.table))])
            raise InputError(path, self._problem(bad))
        mapped = self.table[raw]  # (H, W) int64
        if (mapped == _INVALID).any():
            raise InputError(path, self._problem(np.unique(raw[mapped == _INVALID])))
        return mapped

    def _problem(self, bad: np.ndarray) -> str:
        shown = ", ".join(str(int(v)) for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
        valid = np.flatnonzero(self.table != _INVALID)
        return (
            f"label values {{{shown}}} are outside the {self.name} mapping "
            f"(valid raw values: {_ranges(valid)})"
        )

    def valid_raw_values(self) -> np.ndarray:
        """Sorted raw values this mapping accepts."""
        return np.flatnonzero(self.table != _INVALID)


def _ranges(values: np.ndarray) -> str:
    """Compact text of sorted ints: [0,1,2,5,255] -> '0-2, 5, 255'."""
    parts: list[str] = []
    start = prev = None
    for v in (int(x) for x in values):
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
            start = prev = v
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else str(start))
    return ", ".join(parts)


def make_mapping(name: str, pairs: dict[int, int], n_classes: int) -> LabelMapping:
    """Build a mapping from explicit raw -> class pairs; every raw value not listed is invalid."""
    size = max(pairs) + 1 if pairs else 1
    table = np.full(size, _INVALID, dtype=np.int64)
    for raw, cls in pairs.items():
        if raw < 0:
            raise ValueError(f"raw label values must be >= 0, got {raw}")
        if not IGNORE <= cls < n_classes:
            raise ValueError(f"class id {cls} for raw value {raw} is outside [-1, {n_classes})")
        table[raw] = cls
    table.setflags(write=False)
    return LabelMapping(name=name, table=table, n_classes=n_classes)


def identity_mapping(name: str, n_classes: int, ignore_values: tuple[int, ...] = (255,)) -> LabelMapping:
    """Raw values 0..n_classes-1 are class ids; ``ignore_values`` -> -1; everything else invalid."""
    pairs = {i: i for i in range(n_classes)}
    for v in ignore_values:
        if v < n_classes:
            raise ValueError(f"ignore value {v} collides with class id range [0, {n_classes})")
        pairs[v] = IGNORE
    return make_mapping(name, pairs, n_classes)


def _cocostuff27() -> LabelMapping:
    pairs = dict(enumerate(COCOSTUFF_FINE_TO_COARSE))
    pairs[255] = IGNORE  # stuffthingmaps "unlabeled"
    return make_mapping("cocostuff27", pairs, len(COCOSTUFF27_CLASS_NAMES))


def _cityscapes27() -> LabelMapping:
    # labelIds 0-6 (unlabeled, ego vehicle, rectification border, out of roi, static, dynamic, ground)
    # are ignored; 7..33 -> 0..26. Anything above 33 is not a Cityscapes labelId.
    pairs = {i: (i - 7 if i >= 7 else IGNORE) for i in range(34)}
    return make_mapping("cityscapes27", pairs, len(CITYSCAPES27_CLASS_NAMES))


def _potsdam3() -> LabelMapping:
    pairs = dict(POTSDAM_FINE_TO_COARSE)
    pairs[255] = IGNORE
    return make_mapping("potsdam3", pairs, len(POTSDAM3_CLASS_NAMES))


COCOSTUFF27 = _cocostuff27()
CITYSCAPES27 = _cityscapes27()
POTSDAM3 = _potsdam3()
CAMVID11 = identity_mapping("camvid11", len(CAMVID11_CLASS_NAMES), ignore_values=(11,))  # 11 = void
