"""Cityscapes with STEGO's 27 classes ("cityscapes27", docs/references.md §1.1, §2.2).

torchvision ``Cityscapes`` layout::

    <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Ids are ``<city>/<city>_<seq>_<frame>``.
"""
from __future__ import annotations

from pathlib import Path

from usseg_core.datasets.base import Dataset, require_dir
from usseg_core.datasets.mappings import CITYSCAPES27, CITYSCAPES27_CLASS_NAMES
from usseg_core.datasets.protocol import DatasetProtocol
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

    protocol = DatasetProtocol(
        folder="cityscapes",
        # STEGO: 320 short side + centre crop (docs/methods/protocol.md §5 S8)
        eval_policy="center_crop", eval_size=320,
        # [code:STEGO] five-crops (ratio 0.5), each Resize(224) of the short side + CenterCrop(224)
        train_policy="five_crop", train_crop_resize="short_side",
        overseg_schedule="cityscapes",  # HSG [001] §5.8: Cityscapes with PMI edges
        hsg_test_grid=(12, 24),  # HSG [001] §1.3: n0 = 12 x 24 for Cityscapes
        retrieval_labels="reference",  # twke18/HSG's memory labels (docs/methods/hsg.md, Deviations: H7)
    )

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
