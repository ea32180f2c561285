"""ISPRS Potsdam in IIC's preparation, 3 coarse classes ("potsdam3", docs/references.md §1.1, §2.3).

Layout::

    <root>/imgs/<id>.mat     # key "img": (H, W, 4) RGB + near-infrared; only RGB is used
    <root>/gt/<id>.mat       # key "gt": (H, W) fine classes 0..5, 255 = ignore
    <root>/labelled_train.txt, unlabelled_train.txt, labelled_test.txt   # one id per line

train -> labelled_train (+ unlabelled_train with ``include_unlabelled``), val -> labelled_test.
The manifest hashes the .mat files' bytes like any other file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from usseg_core import imageio
from usseg_core.datasets.base import Dataset, check_split, read_id_list, require_dir
from usseg_core.datasets.mappings import POTSDAM3, POTSDAM3_CLASS_NAMES
from usseg_core.datasets.protocol import DatasetProtocol
from usseg_core.datasets.registry import register_dataset

IMAGE_KEY = "img"
LABEL_KEY = "gt"
_SPLIT_LISTS = {"train": "labelled_train.txt", "val": "labelled_test.txt"}
_UNLABELLED_LIST = "unlabelled_train.txt"


@register_dataset("potsdam3")
class Potsdam3(Dataset):
    """Potsdam-3: {roads, cars} -> 0, {buildings, clutter} -> 1, {low vegetation, trees} -> 2.

    Args:
        root: the ``potsdam`` folder.
        split: "train" or "val".
        include_unlabelled: add ``unlabelled_train.txt`` ids to the train split (their label is None).
    """

    protocol = DatasetProtocol(
        folder="potsdam",
        # STEGO: 320 short side + centre crop (docs/methods/protocol.md §5 S8)
        eval_policy="center_crop", eval_size=320,
        # the reference ignores crop_type for Potsdam (its class reads the 200x200 patches whatever crop_type
        # says): the whole patch, Resize(224) + CenterCrop(224); the five-crop resize is then unused
        train_policy="center_crop", train_crop_resize="short_side",
        overseg_schedule="potsdam",  # HSG [001] §5.8: Potsdam with PMI edges
        hsg_test_grid=(6, 6),  # HSG [001] §1.3: n0 = 6 x 6 for Potsdam
        retrieval_labels="reference",  # twke18/HSG's memory labels (docs/methods/hsg.md, Deviations: H7)
    )

    def __init__(self, root: str | Path, split: str, include_unlabelled: bool = False) -> None:
        super().__init__(root, split)
        check_split(split, tuple(_SPLIT_LISTS), self.name)
        images_dir = require_dir(self.root / "imgs", "Potsdam image folder does not exist")
        index: dict[str, tuple[str, str | None]] = {}
        for id in read_id_list(self.root / _SPLIT_LISTS[split]):
            index[id] = (f"imgs/{id}.mat", f"gt/{id}.mat")
        if include_unlabelled and split == "train":
            for id in read_id_list(self.root / _UNLABELLED_LIST):
                index.setdefault(id, (f"imgs/{id}.mat", None))
        self.class_names = POTSDAM3_CLASS_NAMES
        self.mapping = POTSDAM3
        self._set_index(index, True, images_dir)

    def _read_image_file(self, path: Path) -> np.ndarray:
        # (H, W, 4) RGB+IR, float in [0, 1] or integers -> (H, W, 3) uint8
        return imageio.array_to_rgb(imageio.read_mat(path, IMAGE_KEY), path)

    def _read_raw_label_file(self, path: Path) -> np.ndarray:
        return imageio.read_label(path, mat_key=LABEL_KEY)

    def image_hw(self, id: str) -> tuple[int, int]:
        # .mat has no cheap header read: load the array (Potsdam crops are small).
        arr = imageio.read_mat(self.image_path(id), IMAGE_KEY)
        return int(arr.shape[0]), int(arr.shape[1])
