"""A dataset folder checked in seconds, before any heavy stage (``usseg data check``; ``usseg run`` and
``compare`` check their splits first). Per split, through the dataset class itself (its index is the one truth
of where images, labels and list files are; nothing here re-derives a layout): the folders and list files it
reads; pairing (images without labels: errors; labels without images: warnings, never read; a split with
images and no labels); label values of a sample of labels (``sample`` per split, evenly spaced over the sorted
ids; None: all) against the mapping, their sizes, the raw values that become void, and the known label set
that values outside the mapping fit (another dataset's, Cityscapes trainIds for labelIds); counts against the
published ones (a different count is a warning: a subset is legitimate). Pure: numpy and PIL, no Prefect/torch.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from usseg_core.datasets.base import Dataset
from usseg_core.datasets.mappings import (CAMVID11, CITYSCAPES27, COCOSTUFF27, IGNORE, POTSDAM3, LabelMapping,
                                          _ranges)
from usseg_core.datasets.registry import dataset_class, get_dataset
from usseg_core.errors import InputError, printable

DEFAULT_SAMPLE = 100  # labels read per split unless --all: ~0.3 s per split on CamVid's 480x360 PNGs
MAX_LINES = 10  # lines of one kind per split; the rest is one "N more" line naming the folder
ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class Expected:
    """A dataset's published release: its splits in order with their image counts (None: none published),
    which of them may be absent from a copy, whether they are labelled, and advice for a missing list file."""

    splits: dict[str, int | None]
    source: str
    labelled: bool = True
    optional: tuple[str, ...] = ()
    list_hint: str = ""


# One row per built-in dataset (tests/core/test_data_check.py fails on a registered dataset without one). The
# counts hold for the class's default options (cocostuff27: the "_7" curated lists it reads by default).
EXPECTED: dict[str, Expected | None] = {
    "cocostuff27": Expected({"train": 49_629, "val": 2_175}, "IIC's curated _7 lists, docs/references.md §2.1",
                            list_hint="the curated lists come with STEGO's cocostuff download (curated/train2017, "
                                      "curated/val2017); dataset_options {\"curated\": false} reads every image"),
    "cityscapes27": Expected({"train": 2_975, "val": 500}, "gtFine, docs/references.md §2.2"),
    # IIC's split lists; docs/methods state no per-split count for them (HSG's 7,695 / 855 is another split)
    "potsdam3": Expected({"train": None, "val": None}, "IIC's split lists",
                         list_hint="IIC's Potsdam preparation writes labelled_train.txt, unlabelled_train.txt and "
                                   "labelled_test.txt beside imgs/ and gt/"),
    "camvid11": Expected({"train": 367, "val": 101, "test": 233}, "SegNet release", optional=("test",)),
    "directory": Expected({"all": None}, "a user's folder", labelled=False),
    "synthetic": None,  # rendered by usseg itself (usseg demo): nothing to check
}

# Known raw label sets, to name what labels outside a mapping are (the most specific fitting set is named).
TRAIN_IDS = np.r_[0:19, 255]
LABEL_SETS: tuple[tuple[str, str, np.ndarray], ...] = (
    ("camvid11", "CamVid labels (camvid11)", CAMVID11.valid_raw_values()),
    ("potsdam3", "IIC's Potsdam labels (potsdam3)", POTSDAM3.valid_raw_values()),
    ("trainIds", "Cityscapes trainIds", TRAIN_IDS),
    ("cityscapes27", "Cityscapes labelIds (cityscapes27)", CITYSCAPES27.valid_raw_values()),
    ("cocostuff27", "COCO-Stuff stuffthingmaps (cocostuff27)", COCOSTUFF27.valid_raw_values()),
)
TRAIN_IDS_HINT = ("cityscapes27 reads labelIds (0-33; class = label id - 7, ids 0-6 void), from the "
                  "*_gtFine_labelIds.png files, not *_gtFine_labelTrainIds.png (trainIds 0-18, 255)")
# A label file of another kind beside the expected one: what it is.
OTHER_LABEL_FILES = {"_gtFine_labelTrainIds.png": TRAIN_IDS_HINT}


@dataclass(frozen=True)
class Problem:
    """One line of the check: ``severity`` (error | warning), the file or folder, what is wrong with it."""

    severity: str
    path: Path
    problem: str
    split: str | None = None
    kind: str = ""  # layout, missing-image, missing-label, other-label-files, unlabelled, orphan-label, label,
    #                 size, other-dataset, all-void, count, absent-split

    def line(self) -> str:
        return printable(f"{self.severity}: {self.path}: {self.problem}")


@dataclass(frozen=True)
class SplitSummary:
    """One split: ``labels`` None when unlabelled; classes and void values of the ``labels_read`` labels."""

    split: str
    images: int
    labels: int | None
    published: int | None
    labels_read: int
    n_classes: int
    classes_seen: tuple[int, ...]
    void_values: tuple[int, ...]
    void_fraction: float | None  # void pixels / pixels of the labels read


@dataclass(frozen=True)
class DataCheck:
    """The result of :func:`check_data`: every problem and one summary per split that could be indexed."""

    dataset: str
    root: Path
    sample: int | None
    mapping: LabelMapping | None
    problems: tuple[Problem, ...]
    splits: tuple[SplitSummary, ...]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    def lines(self) -> list[str]:
        """Warnings first, errors last (the last line of a failed check is an error)."""
        return [p.line() for p in self.warnings] + [p.line() for p in self.errors]


def needs_check(dataset: str) -> bool:
    """Whether ``dataset`` has files of a user to check (not the synthetic scenes usseg renders itself)."""
    return EXPECTED.get(dataset, Expected({}, "")) is not None


def check_data(dataset: str, root: str | Path, splits: Sequence[str] | None = None, *,
               sample: int | None = DEFAULT_SAMPLE, options: dict | None = None,
               labelled: Collection[str] | None = None, skip_invalid: bool = False) -> DataCheck:
    """Check the folder ``root`` of ``dataset`` for ``splits`` (None: the published splits; an optional one
    that is absent is a warning).

    Args:
        sample: labels read per split, evenly spaced over the sorted ids; None reads every label.
        options: the dataset's options (``dataset_options``); published counts hold for its defaults only.
        labelled: splits that must have labels (None: every checked split of a labelled release).
        skip_invalid: files the run will leave out (``--on-error skip``): their problems are warnings.

    Raises:
        ConfigError: a setting, not a file: unknown dataset or split name, no data root (as every command).
    """
    cls = dataset_class(dataset)
    expected = EXPECTED.get(dataset) or Expected({}, "")
    options = dict(options or {})
    by_default = splits is None
    names = list(expected.splits) if by_default else list(dict.fromkeys(splits))
    need = set(names if expected.labelled else []) if labelled is None else set(labelled)
    published_ok = _default_options(cls, options)
    problems: list[Problem] = []
    summaries: list[SplitSummary] = []
    mapping = None
    for split in names:
        try:
            ds = get_dataset(dataset, root, split, **options)
        except InputError as err:
            if by_default and split in expected.optional and not err.path.exists():
                problems.append(Problem(WARNING, err.path, f"{err.problem}: split {split} is absent (optional, "
                                        "not checked)", split, "absent-split"))
            else:
                problems.append(Problem(ERROR, err.path, f"{err.problem} (split {split})" + _list_hint(err, expected),
                                        split, "layout"))
            continue
        mapping = mapping or ds.mapping
        published = expected.splits.get(split) if published_ok else None
        split_problems, summary = _check_split(ds, published, expected.source, split in need, sample, skip_invalid)
        problems += split_problems
        summaries.append(summary)
    if not summaries and names:
        problems += _other_layout(dataset, root)
    return DataCheck(dataset, Path(root).expanduser().absolute(), sample, mapping, tuple(problems), tuple(summaries))


def _other_layout(dataset: str, root: str | Path) -> list[Problem]:
    """When no split of ``dataset`` is found: the built-in datasets whose first split the folder holds (not a
    user's ``directory``, which any folder of images fits)."""
    def holds(name: str, split: str) -> bool:
        try:
            return len(get_dataset(name, root, split)) > 0
        except Exception:  # noqa: BLE001 - any refusal: not that layout
            return False

    fits = [name for name, e in EXPECTED.items()
            if name != dataset and e and e.labelled and holds(name, next(iter(e.splits)))]
    return [Problem(ERROR, Path(root), f"no split of {dataset} found; the folder has the layout of "
                    f"{' and '.join(fits)} (--dataset {fits[0]}?)", None, "other-layout")] if fits else []


def _default_options(cls: type[Dataset], options: dict) -> bool:
    params = inspect.signature(cls.__init__).parameters
    return all(k in params and params[k].default == v for k, v in options.items())


def _list_hint(err: InputError, expected: Expected) -> str:
    missing_list = err.path.suffix == ".txt" and not err.path.exists()
    return f": {expected.list_hint}" if missing_list and expected.list_hint else ""


class _Listing(dict):
    """File names per folder, each folder listed once (a missing folder lists nothing)."""

    def __missing__(self, folder: Path) -> frozenset[str]:
        self[folder] = frozenset(os.listdir(folder)) if folder.is_dir() else frozenset()
        return self[folder]

    def exists(self, path: Path) -> bool:
        return path.name in self[path.parent]


def _suffix(id: str, rel: str) -> str:
    """What follows the id in a file name (``_gtFine_labelIds.png``, ``.png``)."""
    base, name = PurePosixPath(id).name, PurePosixPath(rel).name
    return name[len(base):] if name.startswith(base) and len(name) > len(base) else PurePosixPath(rel).suffix


def _key(name: str, suffixes: Collection[str]) -> str | None:
    return next((name[: -len(s)] for s in suffixes if s and name.endswith(s)), None)


def _folder(paths: Sequence[Path], fallback: Path) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else fallback


def _capped(problems: list[Problem], folder: Path, what: str) -> list[Problem]:
    if len(problems) <= MAX_LINES:
        return problems
    first = problems[0]
    more = Problem(first.severity, folder, f"{len(problems) - MAX_LINES} more {what} (the first {MAX_LINES} "
                   "above)", first.split, first.kind)
    return problems[:MAX_LINES] + [more]


def _check_split(ds: Dataset, published: int | None, source: str, need_labels: bool, sample: int | None,
                 skip_invalid: bool) -> tuple[list[Problem], SplitSummary]:
    per_file = WARNING if skip_invalid else ERROR  # --on-error skip leaves such files out of the run
    split, listing = ds.split, _Listing()
    entries = [(id, ds.root / ds.image_relpath(id), ds._entry(id)[1]) for id in ds.ids()]  # the class's index
    images_dir = _folder([img for _, img, _ in entries], ds.root)
    present = [(id, img, lab) for id, img, lab in entries if listing.exists(img)]
    missing = [Problem(per_file, img, "image file does not exist (listed in the split's list)", split,
                       "missing-image") for _, img, _ in entries if not listing.exists(img)]
    problems = _capped(missing, images_dir, "listed images missing")
    expected_labels = [(id, img, ds.root / lab) for id, img, lab in present if lab is not None]
    labelled = [(id, img, lab) for id, img, lab in expected_labels if listing.exists(lab)]
    # a labelled class with no label folder at all (Potsdam without gt/) fails on every label: always an error
    no_folder = ds.has_labels and not labelled and not any(listing[lab.parent] for _, _, lab in expected_labels)
    if not ds.has_labels or no_folder:
        if expected_labels and (need_labels or no_folder):
            problems.append(_unlabelled(ds, expected_labels))
        return problems + _count(ds, len(present), published, source, images_dir), SplitSummary(
            split, len(present), 0 if no_folder else None, published, 0, ds.n_classes, (), (), None)
    problems += _missing_labels(ds, expected_labels, listing, per_file)
    problems += _orphan_labels(ds, entries, listing)
    read, values = _read_sample(ds, labelled, sample, per_file)
    problems += read
    summary = _summary(ds, len(present), len(labelled), published, values)
    problems += _diagnose(ds, values, [lab for _, _, lab in labelled], skip_invalid)
    return problems + _count(ds, len(present), published, source, images_dir), summary


def _unlabelled(ds: Dataset, expected: list[tuple[str, Path, Path]]) -> Problem:
    first = expected[0][2]
    folder = first.parent
    while not folder.parent.exists() and folder.parent != folder:
        folder = folder.parent  # the outermost missing folder
    rel = first.relative_to(ds.root).as_posix()
    return Problem(ERROR, folder, f"split {ds.split} has {len(expected)} images and no labels: the folder does "
                   f"not exist ({ds.name} reads labels like {rel})", ds.split, "unlabelled")


def _missing_labels(ds: Dataset, expected: list[tuple[str, Path, Path]], listing: _Listing,
                    severity: str) -> list[Problem]:
    """Images without their label file; label files of another kind beside them are grouped in one line."""
    plain: list[Problem] = []
    other: dict[str, list[Path]] = {}
    for id, img, lab in expected:
        if listing.exists(lab):
            continue
        key = lab.name[: -len(_suffix(id, lab.name))] or lab.stem
        beside = sorted(n for n in listing[lab.parent] if n != lab.name and n.startswith(key)
                        and n[len(key):len(key) + 1] in ("_", ".", "-"))
        if beside:
            other.setdefault(beside[0][len(key):], []).append(lab.parent / beside[0])
            continue
        plain.append(Problem(severity, lab, f"label file does not exist (the image {img.relative_to(ds.root)} "
                             "has no label; add it, or pass --on-error skip to leave the image out)",  # the manifest's
                             ds.split, "missing-label"))
    problems = _capped(plain, _folder([p.path for p in plain], ds.root), "images without labels")
    for suffix, found in other.items():
        what = OTHER_LABEL_FILES.get(suffix, f"not the label files {ds.name} reads")
        wanted = _suffix(expected[0][0], expected[0][2].name)
        problems.append(Problem(severity, _folder(found, ds.root), f"{len(found)} images of split {ds.split} have "
                                f"no *{wanted} label but a *{suffix} file (e.g. {found[0].name}): {what}",
                                ds.split, "other-label-files"))
    return problems


def _orphan_labels(ds: Dataset, entries: list[tuple[str, Path, str | None]], listing: _Listing) -> list[Problem]:
    """Label files (of the expected name form) in the split's label folders whose image is absent."""
    pairs: dict[Path, Path] = {}
    image_suffixes, label_suffixes = set(), set()
    for id, img, lab in entries:
        if lab is not None:
            pairs.setdefault((ds.root / lab).parent, img.parent)
            image_suffixes.add(_suffix(id, img.name))
            label_suffixes.add(_suffix(id, lab))
    orphans: list[Problem] = []
    for label_dir, image_dir in pairs.items():
        keys = {_key(n, image_suffixes) for n in listing[image_dir]}
        for name in sorted(listing[label_dir]):
            key = _key(name, label_suffixes)
            if key is not None and not name.startswith(".") and key not in keys:
                orphans.append(Problem(WARNING, label_dir / name, f"label file without an image in {image_dir} "
                                       "(never read)", ds.split, "orphan-label"))
    return _capped(orphans, _folder([p.path for p in orphans], ds.root), "labels without images")


def _evenly(items: list, n: int | None) -> list:
    keep = range(len(items)) if n is None or len(items) <= n else np.unique(np.linspace(0, len(items) - 1, n).round())
    return [items[int(i)] for i in keep]


def _value_counts(raw: np.ndarray) -> dict[int, int]:
    flat = raw.ravel()
    if flat.size and flat.min() >= 0 and flat.max() < 1 << 16:
        counts = np.bincount(flat)
        values = np.flatnonzero(counts)
        return dict(zip(values.tolist(), counts[values].tolist()))
    values, counts = np.unique(flat, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


@dataclass
class _Values:
    counts: dict[int, int]  # raw value -> pixels over the labels read
    read: int = 0
    invalid: int = 0  # labels read with a raw value outside the mapping
    all_void: int = 0  # labels read with no pixel of a class


def _read_sample(ds: Dataset, labelled: list[tuple[str, Path, Path]], sample: int | None,
                 severity: str) -> tuple[list[Problem], _Values]:
    assert ds.mapping is not None, f"{type(ds).__name__} is labelled but has no mapping"
    table, values = ds.mapping.table, _Values({})
    bad: list[Problem] = []
    for id, img, lab in _evenly(labelled, sample):
        try:
            raw = ds._read_raw_label_file(lab)  # the dataset's own raw reader (Potsdam's .mat key); (H, W) int64
            hw = ds.image_hw(id)
        except InputError as err:
            bad.append(Problem(severity, err.path, err.problem, ds.split, "label"))
            continue
        values.read += 1
        if raw.shape != tuple(hw):
            bad.append(Problem(severity, lab, f"label size {raw.shape[1]}x{raw.shape[0]} (WxH) differs from its "
                               f"image {img.relative_to(ds.root)} size {hw[1]}x{hw[0]}", ds.split, "size"))
        counts = _value_counts(raw)
        try:
            ds.mapping.apply(raw, lab)
        except InputError as err:  # the mapping's own line: the one the pipeline would stop with
            bad.append(Problem(severity, lab, err.problem, ds.split, "label"))
            values.invalid += 1
        values.counts.update({v: values.counts.get(v, 0) + c for v, c in counts.items()})
        values.all_void += not any(0 <= v < len(table) and table[v] >= 0 for v in counts)
    return _capped(bad, _folder([p.path for p in bad], ds.root), "labels with problems"), values


def _summary(ds: Dataset, images: int, labels: int, published: int | None, values: _Values) -> SplitSummary:
    table, accepted = ds.mapping.table, set(ds.mapping.valid_raw_values().tolist())
    valid = {v: int(table[v]) for v in values.counts if v in accepted}
    void = tuple(sorted(v for v, c in valid.items() if c == IGNORE))
    pixels = sum(values.counts.values())
    fraction = sum(values.counts[v] for v in void) / pixels if pixels else None
    classes = tuple(sorted({c for c in valid.values() if c >= 0}))
    return SplitSummary(ds.split, images, labels, published, values.read, ds.n_classes, classes, void, fraction)


def _diagnose(ds: Dataset, values: _Values, labels: list[Path], skip_invalid: bool) -> list[Problem]:
    """What the labels read are when their values fall outside the mapping; labels with no class pixel."""
    valid = set(ds.mapping.valid_raw_values().tolist())
    seen = sorted(values.counts)
    folder = _folder(labels, ds.root)
    problems = []
    if values.read and values.all_void == values.read:
        problems.append(Problem(WARNING, folder, f"every label read ({values.read}) is entirely void: labels "
                                "withheld (a test split)?", ds.split, "all-void"))
    if 2 * values.invalid < max(values.read, 1):  # a few bad files: their own lines say it
        return problems
    fits = [(name, what, known) for name, what, known in LABEL_SETS
            if name != ds.name and set(seen) <= set(known.tolist())]
    text = f"the label values read ({_ranges(np.array(seen))}) are not {ds.mapping.name} labels " \
           f"(valid raw values: {_ranges(np.array(sorted(valid)))})"
    if fits:
        name, what, known = fits[0]
        text += f"; they fit {what} ({_ranges(known)})" + (f": {TRAIN_IDS_HINT}" if name == "trainIds" and
                                                          ds.name == "cityscapes27" else ": labels of another dataset?")
    # most labels of the split: an error even under --on-error skip when every one read is invalid
    severity = WARNING if skip_invalid and values.invalid < values.read else ERROR
    problems.append(Problem(severity, folder, text, ds.split, "other-dataset"))
    return problems


def _count(ds: Dataset, images: int, published: int | None, source: str, folder: Path) -> list[Problem]:
    if published is None or images == published:
        return []
    return [Problem(WARNING, folder, f"split {ds.split} has {images:,} images, the published one {published:,} "
                    f"({source}): a subset or another release; scores on it are not the papers' protocol",
                    ds.split, "count")]
