"""The spec of flow ``segment`` (``usseg segment``, deployments ``segment/<dataset>``): a trained head over
a folder, a dataset split or image files, with the names a person gave its clusters.

Beside ``usseg_core/spec.py`` (which holds the other flows' specs) and built the same way: a frozen pydantic
model, every default written here once, everything checked when it is built: the image files exist, a
names file parses (``usseg_core.gallery.read_names``: one line naming the file, exit code 4), the choices
are valid. Whether the names fit the model's clusters is checked by the flow once it has read the model,
before any image is segmented.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from usseg_core.errors import ConfigError, InputError
from usseg_core.spec import Where

Clusterer = Literal["own", "kmeans"]


class SegmentSpec(Where):
    """``usseg segment`` / flow ``segment``: label maps, colour maps, overlays, class areas and an index
    page for images, with a trained head (its own backbone)."""

    model: str = Field(description="Head artifact key (a unique prefix is enough; `usseg storage ls --stage head`).")
    dataset: str = Field("directory", description="Dataset registry name of the images (directory: a folder of "
                                                  "your own, given with data_root).")
    split: str = Field("all", description="Split to segment (directory: \"all\" = the whole folder).")
    images: list[str] = Field(default_factory=list, description="Image files to segment instead of a dataset "
                                                                "split (ids are their file stems).")
    names: str | None = Field(None, description="names.yaml: cluster id -> name, for the table and the index "
                                                "page (the cluster gallery of `usseg run` writes one to copy).")
    out: str | None = Field(None, description="Also copy the pictures, areas.parquet and index.html into this "
                                              "folder (None: they stay in the store).")
    clusterer: Clusterer = Field("own", description="own (the head's: STEGO's cluster probe, PiCIE's centroids; "
                                                    "k-means for HSG) | kmeans.")
    k: int | None = Field(None, ge=2, description="K of the k-means clusterer (None: the head's number of classes).")
    run_crf: bool = Field(True, description="Dense CRF refinement of the labels.")
    long_side: int = Field(480, ge=8, description="Images are resized to this long side for the backbone.")
    shard_size: int = Field(16, ge=1, description="Images per task (the fan-out unit).")

    @field_validator("images", mode="before")
    @classmethod
    def _none_is_empty(cls, value):
        return [] if value is None else value

    @model_validator(mode="after")
    def _check_segment(self):
        if not self.model.strip():
            raise ConfigError("--model: give a head artifact key (usseg storage ls --stage head)")
        if self.images and self.data_root is not None:
            raise ConfigError("give image files or --data-root, not both")
        for image in self.images:
            if not Path(image).expanduser().is_file():
                raise InputError(image, "no such image file")
        if self.names is not None:
            from usseg_core.gallery import read_names

            read_names(self.names)
        return self

    def names_map(self) -> dict[int, str]:
        """Cluster id -> name from ``names`` (empty without a names file)."""
        from usseg_core.gallery import read_names

        return read_names(self.names) if self.names is not None else {}
