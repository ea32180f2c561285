"""Cityscapes with STEGO's 27 classes ("cityscapes27", REFERENCES.md §1.1, §2.2).

torchvision ``Cityscapes`` layout::

    <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Ids are ``<city>/<city>_<seq>_<frame>``.
"""
from __future__ import annotations

from pathlib import Path

from usseg_core.datasets.base import EVAL_CENTER_CROP_320, Dataset, require_dir
from usseg_core.datasets.mappings import CITYSCAPES27, CITYSCAPES27_CLASS_NAMES
from usseg_core.datasets.registry import register_dataset

_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"


@register_dataset("cityscapes27")
class Cityscapes27(Dataset):
    """Cityscapes fine annotations, labelIds - 7 (ids 0-6 ignored, > 33 rejected).

    Args:
        root: the Cityscapes root (holding ``leftImg8bit`` and ``gtFine``).
        split: a folder under ``leftImg8bit`` ("train", "val", "test", ...).
    """

    eval_policy = EVAL_CENTER_CROP_320

    def __init__(self, root: str | Path, split: str) -> None:
        super().__init__(root, split)
        images_dir = require_dir(self.root / "leftImg8bit" / split, "Cityscapes image split folder does not exist")
        labelled = (self.root / "gtFine" / split).is_dir()
        index: dict[str, tuple[str, str | None]] = {}
        for city in sorted(p for p in images_dir.iterdir() if p.is_dir()):
            for image in sorted(city.glob("*" + _IMAGE_SUFFIX)):
                base = image.name[: -len(_IMAGE_SUFFIX)]
                id = f"{city.name}/{base}"
                index[id] = (
                    f"leftImg8bit/{split}/{id}{_IMAGE_SUFFIX}",
                    f"gtFine/{split}/{id}{_LABEL_SUFFIX}",
                )
        self.class_names = CITYSCAPES27_CLASS_NAMES
        self.mapping = CITYSCAPES27
        self._set_index(index, labelled, images_dir)
