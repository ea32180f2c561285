"""Manifests: the fingerprint of a dataset split (ids, relative paths, byte sizes, sha256).

``Manifest.hash`` is the dataset split's identity in every downstream cache key. It covers the
dataset name, the split and every entry's (id, image relpath, size, sha256, label relpath, label
sha256) — but **not** the root folder, so moving or re-mounting the data keeps every cache valid,
while changing a single byte of any image or label changes it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath


from usseg_core.datasets.base import Dataset
from usseg_core.errors import ConfigError, InputError, printable

MANIFEST_VERSION = 1
_CHUNK = 1 << 20


@dataclass
class ManifestEntry:
    """One image of a split: its id, file (posix path relative to the root), byte size and sha256,
    and the label file and its sha256 when labelled."""

    id: str
    image: str
    size: int
    sha256: str
    label: str | None = None
    label_sha256: str | None = None


@dataclass
class Manifest:
    """A dataset split's file list with content hashes.

    Attributes:
        dataset: registry name.
        split: split name.
        root: absolute root folder at build time (informative; not part of ``hash``).
        entries: valid images in id order.
        skipped: files left out by ``on_error="skip"``: ``{"id", "path", "problem"}`` dicts.
    """

    dataset: str
    split: str
    root: str
    entries: list[ManifestEntry]
    skipped: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_id = {e.id: e for e in self.entries}
        if len(self._by_id) != len(self.entries):
            raise ConfigError(f"manifest of {self.dataset}/{self.split} has duplicate ids")

    @property
    def hash(self) -> str:
        """sha256 (hex) over dataset, split and every entry's fields; independent of ``root``."""
        h = hashlib.sha256()
        h.update(json.dumps(["usseg-manifest", MANIFEST_VERSION, self.dataset, self.split]).encode())
        for e in self.entries:
            # one JSON array per entry: unambiguous separators, None stays distinct from "None"
            h.update(b"\n")
            h.update(json.dumps([e.id, e.image, e.size, e.sha256, e.label, e.label_sha256]).encode())
        return h.hexdigest()

    @property
    def ids(self) -> list[str]:
        """Ids in manifest order."""
        return [e.id for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def entry(self, id: str) -> ManifestEntry:
        """The entry of ``id`` (KeyError if absent)."""
        try:
            return self._by_id[id]
        except KeyError:
            raise KeyError(f"manifest of {self.dataset}/{self.split} has no id {id!r}") from None

    def image_path(self, id: str, root: str | Path | None = None) -> Path:
        """Absolute image path of ``id`` under ``root`` (default: the build root), checked to stay inside."""
        return resolve_under(root if root is not None else self.root, self.entry(id).image)

    def to_json(self, path: str | Path) -> None:
        """Write the manifest as JSON (atomically: a temp file renamed into place)."""
        path = Path(path)
        doc = {
            "version": MANIFEST_VERSION,
            "dataset": self.dataset,
            "split": self.split,
            "root": self.root,
            "hash": self.hash,
            "entries": [asdict(e) for e in self.entries],
            "skipped": self.skipped,
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)

    @classmethod
    def from_json(cls, path: str | Path) -> Manifest:
        """Read a manifest written by :meth:`to_json`; raise InputError if malformed or tampered."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
            entries = [ManifestEntry(**e) for e in doc["entries"]]
            manifest = cls(doc["dataset"], doc["split"], doc["root"], entries, list(doc.get("skipped", [])))
        except FileNotFoundError as err:
            raise InputError(path, "manifest file does not exist") from err
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InputError(path, f"is not a valid manifest ({type(err).__name__}: {err})") from err
        for e in entries:  # relpaths from a file are untrusted: refuse absolute / '..' paths early
            for rel in (e.image, e.label):
                if rel is not None and (PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts):
                    raise InputError(path, f"entry {e.id!r} has a path escaping the root: {rel!r}")
        if "hash" in doc and doc["hash"] != manifest.hash:
            raise InputError(path, "manifest hash does not match its entries (edited by hand?)")
        return manifest


def resolve_under(root: str | Path, relpath: str) -> Path:
    """``root / relpath`` resolved, refusing paths that leave ``root``.

    Raises:
        InputError: ``relpath`` is absolute, or resolves (through '..' or a symlink) outside ``root``.
    """
    if PurePosixPath(relpath).is_absolute() or Path(relpath).is_absolute() or relpath.startswith("\\"):
        raise InputError(relpath, f"path must be relative to the dataset root {root}")
    base = Path(root).resolve()
    target = (base / relpath).resolve()
    if not target.is_relative_to(base):
        raise InputError(relpath, f"path escapes the dataset root {base} (resolves to {target})")
    return target


def file_sha256(path: Path) -> tuple[int, str]:
    """(byte size, sha256 hex) of a file, read in 1 MiB chunks; InputError if unreadable."""
    h = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
    except FileNotFoundError as err:
        raise InputError(path, "file does not exist") from err
    except OSError as err:
        raise InputError(path, f"cannot be read ({err.strerror or err})") from err
    return size, h.hexdigest()


def _entry_for(dataset: Dataset, id: str, validate: bool) -> ManifestEntry:
    image_path = dataset.image_path(id)
    size, sha = file_sha256(image_path)
    if size == 0:
        raise InputError(image_path, "file is empty (0 bytes)")
    label_rel = dataset.label_relpath(id)
    label_sha = None
    if label_rel is not None:
        label_path = dataset.root / label_rel
        if not label_path.exists():
            raise InputError(label_path, f"label file does not exist (the image {dataset.image_relpath(id)} "
                                         "has no label; add it, or pass --on-error skip to leave the image out)")
        _, label_sha = file_sha256(label_path)
    if validate:
        dataset.check(id)
    return ManifestEntry(id, dataset.image_relpath(id), size, sha, label_rel, label_sha)


def build_manifest(
    dataset: Dataset, *, on_error: str = "raise", validate: bool = True, progress: bool = True
) -> Manifest:
    """Hash (and optionally fully validate) every file of a dataset split.

    Args:
        dataset: the split to fingerprint.
        on_error: "raise" — the first invalid file raises its InputError; "skip" — the file is
            listed in ``skipped`` with its problem and left out of ``entries``.
        validate: run ``dataset.check(id)`` (full decode of image and label, label mapping and size
            checks) for every id; False only hashes the files.
        progress: show a tqdm progress bar.

    Raises:
        ConfigError: unknown ``on_error``.
        InputError: an invalid file with ``on_error="raise"``, or no valid file at all.
    """
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"build_manifest: on_error must be 'raise' or 'skip', got {on_error!r}")
    entries: list[ManifestEntry] = []
    skipped: list[dict] = []
    from tqdm.auto import tqdm  # here: a cached command never builds a manifest

    for id in tqdm(dataset.ids(), desc=f"manifest {dataset.name}/{dataset.split}", disable=not progress):
        try:
            entries.append(_entry_for(dataset, id, validate))
        except InputError as err:
            if on_error == "raise":
                raise
            path = err.path.as_posix()
            if err.path.is_absolute() and err.path.is_relative_to(dataset.root):
                path = err.path.relative_to(dataset.root).as_posix()
            skipped.append({"id": id, "path": printable(path), "problem": printable(err.problem)})
    if not entries:
        raise InputError(dataset.root, f"no valid images in {dataset.name} split {dataset.split!r} ({len(skipped)} skipped)")
    return Manifest(dataset.name, dataset.split, str(dataset.root), entries, skipped)


VERIFY_CONTENT_ENV = "USSEG_VERIFY_CONTENT"


def verify_content() -> bool:
    """True when ``USSEG_VERIFY_CONTENT`` is set to 1/true/yes: manifests are keyed by file contents."""
    return os.environ.get(VERIFY_CONTENT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def listing_signature(ds, *, content: bool = False) -> str:
    """Identity of a split's files: decides whether a manifest (and everything keyed by it) is reused.

    The rule: by default it covers every file's relative path, byte size and mtime (ns) — a stat() per
    file. A file whose bytes change while its size and mtime stay the same (a tool restoring the mtime,
    ``os.utime``) is therefore *not* noticed and the old manifest and features are reused. With
    ``content=True`` (``USSEG_VERIFY_CONTENT=1``) it covers each file's sha256 instead, so changing any
    byte changes the manifest hash and every downstream key, at the cost of reading every file.

    A file that the index names but that does not exist (an image without its label) enters the
    signature as missing instead of raising: :func:`build_manifest` then reports it as an InputError
    naming the file, or lists it in ``skipped`` under ``on_error="skip"``.
    """
    h = hashlib.sha256()

    def add(line: str) -> None:  # a name that is not valid UTF-8 keeps its bytes (os.fsencode's surrogates)
        h.update(line.encode("utf-8", "surrogateescape"))

    if content:  # the default keeps the signature (and manifest keys) of earlier versions
        h.update(b"content\n")
    for id_ in ds.ids():
        for rel in (ds.image_relpath(id_), ds.label_relpath(id_)):
            if rel is None:
                continue
            path = Path(ds.root) / rel
            try:
                if content:
                    size, sha = file_sha256(path)
                    add(f"{rel}\0{size}\0{sha}\n")
                else:
                    st = os.stat(path)
                    add(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n")
            except (OSError, InputError) as err:
                problem = err.problem if isinstance(err, InputError) else (err.strerror or str(err))
                add(f"{rel}\0missing\0{problem}\n")
    return h.hexdigest()
