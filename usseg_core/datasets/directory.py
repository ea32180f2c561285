"""Any folder of images, optionally with label PNGs ("directory").

Where the images are looked up, first match wins:

1. ``<root>/<split>/images/`` if it exists, else ``<root>/<split>/`` (for a split other than "all");
2. ``<root>/images/`` if it exists, else ``<root>/`` itself (split "all", or no ``<split>`` folder).

Images: jpg/jpeg/png/bmp/tif/tiff/webp, case-insensitive, non-recursive; id = file stem.
Labels (optional): ``labels/<stem>.png`` beside an ``images/`` folder (inside the folder when the
images lie directly in it), single-channel raw class ids, ``ignore_value`` (255) -> -1.
Class names: ``classes.txt`` (one per line) beside the images folder (or inside it, or at the root),
or the option ``n_classes`` (names "class_0", ...). For an unlabelled folder, the class count is the
number of segments the user wants (it sets the cluster count downstream).
"""
from __future__ import annotations

from pathlib import Path

from usseg_core.datasets.base import Dataset, paired_folder_index, require_dir
from usseg_core.datasets.mappings import identity_mapping
from usseg_core.datasets.protocol import DatasetProtocol
from usseg_core.datasets.registry import register_dataset
from usseg_core.errors import ConfigError, InputError

ALL_SPLIT = "all"


def _images_dir(root: Path, split: str) -> Path:
    split_dir = root / split
    if split != ALL_SPLIT and split_dir.is_dir():
        return split_dir / "images" if (split_dir / "images").is_dir() else split_dir
    return root / "images" if (root / "images").is_dir() else root


def _beside(images_dir: Path, name: str) -> Path:
    """``name`` next to an ``images/`` folder, or inside a folder that holds the images directly."""
    return images_dir.parent / name if images_dir.name == "images" else images_dir / name


def _read_class_names(path: Path) -> tuple[str, ...]:
    try:
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot be read as a text file ({err})") from err
    if not names:
        raise InputError(path, "class list is empty")
    if len(set(names)) != len(names):
        raise InputError(path, "class list has duplicate names")
    return names


@register_dataset("directory")
class DirectoryDataset(Dataset):
    """A user folder of images (see the module docstring for the layout rules).

    STEGO and OMH train on the whole image, short side resized then centre-cropped (the reference's
    DirectoryDataset ignores crop_type); ``--set crops.policy=five_crop`` five-crops it instead.

    Args:
        root: the folder.
        split: a sub-folder name, or "all".
        n_classes: number of classes when there is no ``classes.txt`` (must agree with it if both).
        ignore_value: raw label value meaning "unlabelled" (255).
        use_labels: set False to ignore a ``labels/`` folder.

    Raises:
        ConfigError: labels exist but the class count is unknown, or ``n_classes`` disagrees with
            ``classes.txt``.
    """

    protocol = DatasetProtocol(
        folder=None,  # the user's own folder, always given with --data-root; no deployments
        eval_policy="full", eval_size=None,  # the whole frame: no benchmark protocol to follow
        # the reference's DirectoryDataset ignores crop_type: Resize(224) + CenterCrop(224) of the whole image
        train_policy="center_crop", train_crop_resize="short_side",
        overseg_schedule="coco",  # HSG's everyday-photo setting (COCO-stuff, SE edges): the closest to any folder
        hsg_test_grid=(6, 6),  # HSG [001] §1.3's most common n0 (VOC, COCO-stuff, Potsdam)
        retrieval_labels="valid-majority",  # ours (not a reference dataset)
    )

    def __init__(
        self,
        root: str | Path,
        split: str = ALL_SPLIT,
        n_classes: int | None = None,
        ignore_value: int = 255,
        use_labels: bool = True,
    ) -> None:
        super().__init__(root, split)
        images_dir = require_dir(_images_dir(self.root, split), "image folder does not exist")
        labels_dir = _beside(images_dir, "labels")
        labelled = use_labels and labels_dir.is_dir()
        self.class_names = self._class_names(images_dir, n_classes)
        if labelled:
            if not self.class_names:
                raise ConfigError(
                    f"{labels_dir}: labels found but the number of classes is unknown; add "
                    f"{_beside(images_dir, 'classes.txt')} (one name per line) or pass n_classes"
                )
            if 0 <= ignore_value < len(self.class_names):
                raise ConfigError(f"directory: ignore_value={ignore_value} collides with class ids 0..{len(self.class_names) - 1}")
            self.mapping = identity_mapping("directory", len(self.class_names), ignore_values=(ignore_value,))
        index = paired_folder_index(self.root, images_dir, labels_dir if labelled else None)
        self._set_index(index, labelled, images_dir)

    def _class_names(self, images_dir: Path, n_classes: int | None) -> tuple[str, ...]:
        candidates = [_beside(images_dir, "classes.txt"), images_dir / "classes.txt", self.root / "classes.txt"]
        found = next((p for p in candidates if p.is_file()), None)
        names = _read_class_names(found) if found is not None else ()
        if n_classes is not None:
            if n_classes < 1:
                raise ConfigError(f"directory: n_classes must be >= 1, got {n_classes}")
            if names and len(names) != n_classes:
                raise ConfigError(f"directory: n_classes={n_classes} but {found} lists {len(names)} classes")
            names = names or tuple(f"class_{i}" for i in range(n_classes))
        return names
