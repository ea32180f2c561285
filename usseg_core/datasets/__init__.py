"""Datasets: one registry of named dataset layouts, label mappings and manifests.

Usage::

    from usseg_core.datasets import get_dataset, build_manifest
    ds = get_dataset("camvid11", "../shared/data/camvid", "val")
    manifest = build_manifest(ds)          # ids, relative paths, sizes, sha256; manifest.hash = identity
    image, label = ds.load_pair(ds.ids()[0])

Registry names: cocostuff27, cityscapes27, potsdam3, camvid11, directory, synthetic.
"""
from __future__ import annotations

# Importing the dataset modules registers them, in this order: the order of listings and deployments.
from usseg_core.datasets import cocostuff, cityscapes, potsdam, camvid, directory, synthetic  # noqa: F401,I001
from usseg_core.datasets.base import EVAL_CENTER_CROP_320, EVAL_FULL, IMAGE_EXTENSIONS, Dataset
from usseg_core.datasets.protocol import DatasetProtocol
from usseg_core.datasets.manifest import Manifest, ManifestEntry, build_manifest, resolve_under
from usseg_core.datasets.mappings import IGNORE, LabelMapping
from usseg_core.datasets.registry import (dataset_folders, dataset_protocol, get_dataset, list_datasets,
                                          register_dataset)
from usseg_core.datasets.synthetic import ensure_synthetic, render_synthetic

__all__ = [
    "Dataset",
    "DatasetProtocol",
    "EVAL_CENTER_CROP_320",
    "EVAL_FULL",
    "IGNORE",
    "IMAGE_EXTENSIONS",
    "LabelMapping",
    "Manifest",
    "ManifestEntry",
    "build_manifest",
    "dataset_folders",
    "dataset_protocol",
    "ensure_synthetic",
    "get_dataset",
    "list_datasets",
    "register_dataset",
    "render_synthetic",
    "resolve_under",
]
