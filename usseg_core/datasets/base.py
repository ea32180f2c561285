"""The :class:`Dataset` base class: ids, validated images, mapped labels, class names.

A concrete dataset only has to build an index ``{id: (image relpath, label relpath | None)}`` in its
constructor and name its :class:`~usseg_core.datasets.mappings.LabelMapping`; loading, mapping,
size checks and error messages live here once.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import ClassVar

import numpy as np

from usseg_core import imageio
from usseg_core.datasets.mappings import LabelMapping
from usseg_core.datasets.protocol import DatasetProtocol
from usseg_core.errors import ConfigError, InputError, printable

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Legacy one-word evaluation policies (``Dataset.eval_policy``, derived from the protocol): the benchmark
# datasets are evaluated at 320 short side + centre crop like STEGO; CamVid and user folders on the full
# frame (docs/methods/protocol.md §5 S8).
EVAL_CENTER_CROP_320 = "center_crop_320"
EVAL_FULL = "full"

# Training views of the five-crop heads (STEGO, OMH: features + KNN), as the reference builds them
# ([code:STEGO] data.py ContrastiveSegDataset, crop_datasets.py, precompute_knns.py); each dataset's
# protocol says which (see usseg_core/views.py for the two five-crop resizes).
TRAIN_FIVE_CROP = "five_crop"
TRAIN_CENTER_CROP = "center_crop"


class Dataset:
    """A split of a segmentation dataset on disk.

    Subclasses declare their ``protocol`` (a :class:`DatasetProtocol`), get ``name`` from
    :func:`~usseg_core.datasets.registry.register_dataset`, set ``class_names`` and ``mapping`` and call
    :meth:`_set_index` in ``__init__``.

    Attributes:
        name: registry name, e.g. "cocostuff27".
        protocol: folder, training and evaluation views, HSG's schedule and grid (the class's own).
        root: absolute dataset root folder.
        split: split name as given by the user.
        class_names: class names in class-id order; empty when unlabelled and unknown.
        eval_policy, train_policy, train_crop_resize: the protocol's fields under their older names
            (``"center_crop_320"``/``"full"``, ...), set from ``protocol`` for the code that reads them.
        mapping: raw label value -> class id table, None when the dataset has no labels.
    """

    name: ClassVar[str] = ""
    protocol: ClassVar[DatasetProtocol]
    eval_policy: ClassVar[str]
    train_policy: ClassVar[str]
    train_crop_resize: ClassVar[str]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        protocol = cls.__dict__.get("protocol")
        if isinstance(protocol, DatasetProtocol):  # derived, never declared twice
            cls.eval_policy = protocol.eval_policy_name
            cls.train_policy = protocol.train_policy
            cls.train_crop_resize = protocol.train_crop_resize

    def __init__(self, root: str | Path, split: str) -> None:
        self.root = Path(root).expanduser().absolute()
        self.split = split
        self.class_names: tuple[str, ...] = ()
        self.mapping: LabelMapping | None = None
        self._labelled = False
        self._index: dict[str, tuple[str, str | None]] = {}
        self._ids: list[str] = []
        if not self.root.is_dir():  # a setting (--data-root, $USSEG_DATA_ROOT), not a bad file: exit 3
            raise ConfigError(f"data root {self.root} " + ("is not a folder" if self.root.exists() else
                              "does not exist (pass --data-root, or set $USSEG_DATA_ROOT)"))
        check_split_name(split, self.root)

    # ------------------------------------------------------------------ index
    def _set_index(self, index: dict[str, tuple[str, str | None]], labelled: bool, where: Path) -> None:
        """Install the id index; ``where`` names the folder reported when the index is empty."""
        if not index:
            raise InputError(where, f"no images found for {self.name} split {self.split!r}")
        check_inside_root(self.root, index)
        self._index = index
        self._ids = sorted(index)
        self._labelled = labelled

    @property
    def n_classes(self) -> int:
        """Number of classes (len(class_names))."""
        return len(self.class_names)

    @property
    def has_labels(self) -> bool:
        """True when the split has label maps (load_label returns arrays)."""
        return self._labelled

    def ids(self) -> list[str]:
        """All ids of the split in a stable (sorted) order."""
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, root={str(self.root)!r}, split={self.split!r}, n={len(self)})"

    def _entry(self, id: str) -> tuple[str, str | None]:
        try:
            return self._index[id]
        except KeyError:
            raise KeyError(f"{self.name} split {self.split!r} has no id {id!r}") from None

    def image_relpath(self, id: str) -> str:
        """Image file of ``id``, as a posix path relative to ``root``."""
        return self._entry(id)[0]

    def label_relpath(self, id: str) -> str | None:
        """Label file of ``id`` relative to ``root`` (posix), or None when ``id`` has no label."""
        return self._entry(id)[1] if self._labelled else None

    def image_path(self, id: str) -> Path:
        """Absolute image path of ``id``."""
        return self.root / self.image_relpath(id)

    def label_path(self, id: str) -> Path | None:
        """Absolute label path of ``id`` or None."""
        rel = self.label_relpath(id)
        return None if rel is None else self.root / rel

    # ------------------------------------------------------------------ reading (overridable)
    def _read_image_file(self, path: Path) -> np.ndarray:
        return imageio.read_rgb(path)

    def _read_raw_label_file(self, path: Path) -> np.ndarray:
        return imageio.read_label(path)

    def image_hw(self, id: str) -> tuple[int, int]:
        """(H, W) of the image of ``id`` without decoding the pixels where the format allows."""
        return imageio.image_size(self.image_path(id))

    # ------------------------------------------------------------------ public loading
    def load_image(self, id: str) -> np.ndarray:
        """(H, W, 3) uint8 RGB image of ``id``, fully decoded and validated."""
        return self._read_image_file(self.image_path(id))

    def _mapped_label(self, id: str, image_hw: tuple[int, int]) -> np.ndarray | None:
        path = self.label_path(id)
        if path is None:
            return None
        assert self.mapping is not None, f"{type(self).__name__} is labelled but has no mapping"
        raw = self._read_raw_label_file(path)  # (H, W) int64 raw values
        if raw.shape != tuple(image_hw):
            raise InputError(
                path,
                f"label size {raw.shape[1]}x{raw.shape[0]} (WxH) differs from its image "
                f"{self.image_relpath(id)} size {image_hw[1]}x{image_hw[0]}",
            )
        return self.mapping.apply(raw, path)  # (H, W) int64 in [-1, n_classes)

    def load_label(self, id: str) -> np.ndarray | None:
        """(H, W) int64 class ids of ``id`` (-1 = ignore), or None when ``id`` has no label.

        Raises:
            InputError naming the label file: unreadable, a raw value outside the mapping, or a size
            different from the image's.
        """
        if self.label_path(id) is None:
            return None
        return self._mapped_label(id, self.image_hw(id))

    def load_pair(self, id: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Image (H, W, 3) uint8 and label (H, W) int64 | None, decoding the image once."""
        image = self.load_image(id)
        return image, self._mapped_label(id, image.shape[:2])

    def check(self, id: str) -> None:
        """Fully decode and validate the image (and label) of ``id``; raise InputError if invalid."""
        self.load_pair(id)


# ---------------------------------------------------------------------- helpers for subclasses
def require_dir(path: Path, problem: str) -> Path:
    """Return ``path`` if it is a folder, else raise InputError(path, problem)."""
    if not path.is_dir():
        raise InputError(path, problem if not path.exists() else "is not a folder")
    return path


def check_split_name(split: str, root: Path | str, option: str = "--split") -> None:
    """Refuse a split that names a folder outside the data root (absolute, or with a '..' part).

    ``option`` is the command-line option that gave it (``--train-split``, ``--eval-split``), named in the
    message.

    Raises:
        ConfigError: e.g. "--split '../x' leaves the data root /data".
    """
    if not isinstance(split, str) or not split:
        raise ConfigError(f"{option} {split!r}: a split name is required")
    posix = split.replace("\\", "/")
    if PurePosixPath(posix).is_absolute() or Path(split).is_absolute() or ".." in PurePosixPath(posix).parts \
            or ":" in split:
        raise ConfigError(f"{option} {split!r} leaves the data root {root}: a split is a name (or a "
                          "relative folder) inside --data-root")


def check_inside_root(root: Path, index: dict[str, tuple[str, str | None]]) -> None:
    """Refuse an index whose files resolve outside ``root`` ('..' parts, or symlinks leaving it).

    A symlink that stays inside the root is accepted; one whose target lies outside is refused here,
    at dataset construction, as :func:`usseg_core.datasets.manifest.resolve_under` documents.

    Raises:
        InputError: naming the file (the link) and where it resolves to.
    """
    base = root.resolve()
    checked_dirs: dict[Path, Path] = {}
    for image_rel, label_rel in index.values():
        for rel in (image_rel, label_rel):
            if rel is None:
                continue
            if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
                raise InputError(root / rel, f"path leaves the data root {base}")
            path = root / rel
            parent = path.parent  # folders are resolved once: the common case costs one resolve per file
            if parent not in checked_dirs:
                checked_dirs[parent] = parent.resolve()
                if not checked_dirs[parent].is_relative_to(base):
                    raise InputError(parent, f"folder resolves to {checked_dirs[parent]}, outside the data root {base}")
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(base):
                    raise InputError(path, f"is a symlink to {target}, outside the data root {base}")


def list_image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (non-recursive), by extension (case-insensitive), sorted.

    Hidden files (leading '.', e.g. macOS '._x.jpg' resource forks) are skipped.
    """
    return sorted(
        p for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def relposix(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as a posix string."""
    return path.relative_to(root).as_posix()


def check_list_id(id: str, list_file: Path) -> str:
    """Validate an id read from a split list file: it must not be absolute or contain '..'."""
    parts = PurePosixPath(id).parts
    if not id or id.startswith(("/", "\\")) or ".." in parts or "\\" in id or ":" in id:
        raise InputError(list_file, f"invalid id {id!r} (ids must be relative names without '..')")
    return id


def read_id_list(list_file: Path) -> list[str]:
    """Ids from a text file, one per line (blank lines ignored), validated by :func:`check_list_id`."""
    if not list_file.is_file():
        raise InputError(list_file, "split list file does not exist")
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(list_file, f"cannot be read as a text file ({err})") from err
    return [check_list_id(line.strip(), list_file) for line in lines if line.strip()]


def paired_folder_index(
    root: Path, images_dir: Path, labels_dir: Path | None, *, id_prefix: str = "", label_ext: str = ".png"
) -> dict[str, tuple[str, str | None]]:
    """Index images in ``images_dir`` by stem, pairing ``labels_dir/<stem><label_ext>``.

    Raises:
        InputError: two images in the folder share a stem (their ids would collide).
    """
    index: dict[str, tuple[str, str | None]] = {}
    for image in list_image_files(images_dir):  # a name that is not UTF-8 keeps its file; its id is escaped
        id = id_prefix + printable(image.stem)
        if id in index:
            raise InputError(images_dir, f"two images share the name {id!r}: ids would collide")
        label = None if labels_dir is None else relposix(labels_dir / (image.stem + label_ext), root)
        index[id] = (relposix(image, root), label)
    return index


def check_split(split: str, known: tuple[str, ...], dataset: str) -> None:
    """Raise ConfigError when ``split`` is not one of ``known``."""
    if split not in known:
        raise ConfigError(f"{dataset}: unknown split {split!r}; known splits: {', '.join(known)}")
