"""COCO-Stuff with the 27 coarse classes of STEGO/PiCIE ("cocostuff27", docs/references.md §1.1, §2.1).

Layout (STEGO's ``cocostuff/`` folder)::

    <root>/images/{train2017,val2017}/<id>.jpg
    <root>/annotations/{train2017,val2017}/<id>.png     # stuffthingmaps: 0..181, 255 = unlabeled
    <root>/curated/{train2017,val2017}/Coco164kFull_Stuff_Coarse_7.txt
"""
from __future__ import annotations

from pathlib import Path

from usseg_core.datasets.base import (
    Dataset,
    check_split,
    list_image_files,
    read_id_list,
    require_dir,
)
from usseg_core.datasets.mappings import COCOSTUFF27, COCOSTUFF27_CLASS_NAMES
from usseg_core.datasets.protocol import DatasetProtocol
from usseg_core.datasets.registry import register_dataset

# PiCIE trains and evaluates on the "_7" curated lists (49,629 train / 2,175 val); STEGO evaluates on
# the same val list (docs/references.md §2.1). STEGO's train list is "Coco164kFull_Stuff_Coarse.txt": pass
# it as curated_list to reproduce STEGO's training set.
DEFAULT_CURATED_LIST = "Coco164kFull_Stuff_Coarse_7.txt"


@register_dataset("cocostuff27")
class CocoStuff27(Dataset):
    """COCO-Stuff 164k mapped 182 fine -> 27 coarse classes.

    Args:
        root: the ``cocostuff`` folder.
        split: "train" or "val" (folders ``train2017`` / ``val2017``).
        curated: restrict ids to the IIC curated list (default True, the benchmark protocol).
        curated_list: file name of the list inside ``curated/<split>2017/`` (or an absolute path).
    """

    protocol = DatasetProtocol(
        folder="cocostuff",
        # STEGO / PiCIE: 320 short side + centre crop (docs/methods/protocol.md §5 S8)
        eval_policy="center_crop", eval_size=320,
        # [code:STEGO] five-crops (ratio 0.5), each Resize(224) of the short side + CenterCrop(224)
        train_policy="five_crop", train_crop_resize="short_side",
        overseg_schedule="coco",  # HSG [001] §5.8: COCO-stuff with SE edges
        hsg_test_grid=(6, 6),  # HSG [001] §1.3: n0 = 6 x 6 for COCO-stuff
        retrieval_labels="reference",  # twke18/HSG's memory labels (docs/methods/hsg.md, Deviations: H7)
    )

    def __init__(
        self, root: str | Path, split: str, curated: bool = True, curated_list: str = DEFAULT_CURATED_LIST
    ) -> None:
        super().__init__(root, split)
        check_split(split, ("train", "val"), self.name)
        folder = f"{split}2017"
        images_dir = require_dir(self.root / "images" / folder, "COCO-Stuff image folder does not exist")
        labels_dir = self.root / "annotations" / folder
        labelled = labels_dir.is_dir()
        if curated:
            list_file = Path(curated_list)
            if not list_file.is_absolute():
                list_file = self.root / "curated" / folder / curated_list
            ids = read_id_list(list_file)
        else:
            ids = [p.stem for p in list_image_files(images_dir) if p.suffix.lower() == ".jpg"]
        index = {i: (f"images/{folder}/{i}.jpg", f"annotations/{folder}/{i}.png") for i in ids}
        self.class_names = COCOSTUFF27_CLASS_NAMES
        self.mapping = COCOSTUFF27
        self._set_index(index, labelled, images_dir)
