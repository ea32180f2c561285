"""Your own photos end to end (docs/own-images.md): `usseg run` on a folder without labels trains with
``--set n_clusters=K``, skips the rows that need labels in one line and writes the cluster gallery;
`usseg segment --data-root` segments a second folder (flow ``segment``): label PNGs, colour maps, overlays,
class areas under the names of names.yaml, index.html; a re-run is a cache hit, an interrupted run resumes
image by image, a bad names file is one line and exit code 4. The gallery and the index page in headless
Chromium: the pictures load."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from commands.cli import app
from tests.conftest import REPO, artifact_mtimes

K = 4
# The fast settings of tests/flows/test_pipeline.py; a KNN table that fits 8 images.
TRAIN = ("--resolution", "64", "--no-crf", "--set", f"n_clusters={K}", "--set", "steps=30", "--set", "batch_size=4",
         "--set", "knn.k=5", "--set", "num_neighbors=5")
SEGMENT = ("--no-crf", "--long-side", "96", "--shard-size", "2")


def _invoke(*args: str, code: int = 0):
    """The command in this process; a usseg error is read as ``usseg`` (commands/cli.py main) reports it:
    ``res.line`` its one line, the code its exit code."""
    from commands.common import error_line

    res = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "240"})
    got, res.line = res.exit_code, None
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        res.line, got = error_line(res.exception)
    assert got == code, res.output + repr(res.exception)
    return res


def _folder(src: Path, dst: Path) -> Path:
    """The images of a synthetic split as a plain folder of photos: no labels, no classes.txt."""
    dst.mkdir(parents=True)
    for p in sorted((src / "images").iterdir()):
        shutil.copy(p, dst / p.name)
    return dst


@pytest.fixture(scope="module")
def trained(synthetic_small, tmp_path_factory, prefect_harness):
    tmp = tmp_path_factory.mktemp("own")
    photos, more = _folder(synthetic_small / "train", tmp / "photos"), _folder(synthetic_small / "val", tmp / "more")
    storage = tmp / "storage"
    res = _invoke("run", "stego", "--dataset", "directory", "--data-root", photos, "--storage", storage, *TRAIN)
    head = re.search(r"head artifact: (\w+)", res.output).group(1)
    gallery = Path(re.search(r"cluster gallery: (\S+gallery\.html)", res.output).group(1))
    return {"tmp": tmp, "photos": photos, "more": more, "storage": storage, "head": head, "gallery": gallery,
            "output": res.output}


def test_a_folder_without_labels_trains_with_n_clusters_and_skips_the_labelled_rows(trained):
    out, storage = trained["output"], trained["storage"]
    assert out.count("has no labels") == 1 and ("directory/val has no labels: accuracy, mIoU, linear-probe and "
                                                "retrieval rows skipped (they need labels); the cluster gallery shows "
                                                "the clusters\n") in out
    assert not (storage / "evaluation").exists() and not (storage / "linear-probe").exists()
    (head,) = (storage / "head").iterdir()
    assert json.loads((head / "meta.json").read_text())["params"]["n_classes"] == K  # the clusters asked for
    kmeans = [json.loads(p.read_text())["params"]["k"] for p in (storage / "kmeans").glob("*/meta.json")]
    assert kmeans == [K, K]  # the head's codes and the raw features


def test_without_n_clusters_an_unlabelled_folder_is_one_line_and_exit_3(trained, tmp_path):
    res = _invoke("run", "stego", "--dataset", "directory", "--data-root", trained["photos"], "--storage",
                  tmp_path / "s", "--resolution", "64", "--set", "knn.k=5", "--set", "num_neighbors=5", code=3)
    assert res.line.startswith("directory/train has no labels and no class list: pass --set n_clusters=K, the "
                               "number of kinds of region to find")
    assert not (tmp_path / "s" / "features").exists()  # refused before any work


def test_the_gallery_shows_the_patches_nearest_each_cluster(trained):
    folder = trained["gallery"].parent
    cells = json.loads((folder / "cells.json").read_text())
    photos = sorted(p.stem for p in trained["photos"].iterdir())
    assert {c["id"] for c in cells} <= set(photos) and {c["cluster"] for c in cells} <= set(range(K))
    per_cluster = pd.Series([c["cluster"] for c in cells]).value_counts()
    assert per_cluster.max() <= 8 and per_cluster.sum() == len(cells) > 0
    for c in set(per_cluster.index):  # a row takes distinct images first: 8 images offer 8 patches
        assert len({x["id"] for x in cells if x["cluster"] == c}) == min(8, per_cluster[c])
    grid = np.asarray(Image.open(folder / "gallery.png"))
    assert grid.shape[0] == 4 + K * (96 + 4)  # a row per cluster
    page = trained["gallery"].read_text()
    assert page.count("<figure>") == len(cells) and all(f"{c['id']} (" in page for c in cells)
    assert (folder / "names.yaml").read_text().count("cluster_") == K  # the template to copy


def _segment(trained, *extra, code: int = 0):
    return _invoke("segment", "--model", trained["head"], "--data-root", trained["more"], "--storage",
                   trained["storage"], *SEGMENT, *extra, code=code)


def test_segment_a_second_folder_names_the_clusters_and_reruns_as_a_cache_hit(trained, tmp_path):
    from tasks.stage import CALLED, CHECKED

    names = tmp_path / "names.yaml"
    names.write_text("0: sky\n1: road\n3: 'green stuff'\n")
    out = tmp_path / "out"
    res = _segment(trained, "--names", names, "--out", out)
    ids = sorted(p.stem for p in trained["more"].iterdir())
    assert f"{len(ids)} images ({len(ids)} segmented, 0 already done)" in res.output
    index = Path(re.search(r"index: (\S+index\.html)", res.output).group(1))
    for i in ids:  # the pictures, at each photo's size
        h, w = np.asarray(Image.open(trained["more"] / f"{i}.png")).shape[:2]
        labels = np.asarray(Image.open(out / f"{i}_labels.png"))
        assert labels.shape == (h, w) and labels.max() < K
        assert np.asarray(Image.open(out / f"{i}_overlay.png")).shape == (h, w, 3)
        assert (out / f"{i}_color.png").exists()
    areas = pd.read_parquet(out / "areas.parquet")
    assert list(areas.columns) == ["image_id", "class_id", "class_name", "pixels", "fraction"]
    assert sorted(areas.image_id.unique()) == ids
    assert (areas.groupby("image_id").pixels.sum() == 96 * 128).all()  # every pixel, once
    assert np.allclose(areas.groupby("image_id").fraction.sum(), 1.0)
    named = dict(zip(areas.class_id, areas.class_name))
    assert all(named[c] == {0: "sky", 1: "road", 3: "green stuff"}.get(c, f"cluster_{c}") for c in named)
    for page in (index.read_text(), (out / "index.html").read_text()):
        assert all(f"<td>{i}</td>" in page for i in ids)  # every image has its row
        assert "sky" in page and "road" in page and "green stuff" in page  # the legend
    assert f"href='{ids[0]}_overlay.png'" in (out / "index.html").read_text()  # the copy's links are local
    assert {"gallery", "segment", "segment-report"} <= CALLED  # their cores went through the key check
    assert {("segment", "crf"), ("segment", "long_side"), ("segment-report", "names"),
            ("gallery", "per_cluster")} <= CHECKED

    before = artifact_mtimes(trained["storage"])
    again = _segment(trained, "--names", names)
    assert f"{len(ids)} images (cache hit)" in again.output and f"index: {index}" in again.output
    assert artifact_mtimes(trained["storage"]) == before
    from commands.launch import cached_result  # the command's no-work path: a look-up pass, no flow run
    from flows.segment import segment
    from usseg_core.segment_spec import SegmentSpec

    looked = cached_result(segment, SegmentSpec(model=trained["head"], data_root=str(trained["more"]),
                                                storage=str(trained["storage"]), names=str(names), run_crf=False,
                                                long_side=96, shard_size=2))
    assert looked is not None and looked["report"]["path"] == str(index)

    renamed = tmp_path / "renamed.yaml"
    renamed.write_text("2: water\n")
    res = _segment(trained, "--names", renamed)  # new names: a new report, nothing segmented again
    assert f"{len(ids)} images (cache hit)" in res.output
    page = Path(re.search(r"index: (\S+index\.html)", res.output).group(1)).read_text()
    assert "water" in page and "sky" not in page


def test_an_interrupted_segmentation_resumes_image_by_image(trained, tmp_path, monkeypatch):
    import tasks.segment

    real = tasks.segment.segment_image
    second = np.asarray(Image.open(sorted(trained["more"].iterdir())[1]).convert("RGB"))

    def fails_on_the_second(model, image, **kw):  # every time: a retry of its shard fails too
        if np.array_equal(image, second):
            raise RuntimeError("killed")
        return real(model, image, **kw)

    monkeypatch.setattr(tasks.segment, "segment_image", fails_on_the_second)
    args = ("--long-side", "64")  # a segmentation of its own (another key)
    res = _segment(trained, *args, code=1)
    assert "killed" in res.line
    (folder,) = [p for p in (trained["storage"] / "segment").iterdir() if not (p / "_COMPLETE").exists()]
    done = sorted((folder / "images").glob("*_pixels.json"))
    assert [p.name for p in done] == ["0000_pixels.json", "0002_pixels.json"]  # all but the one that failed
    kept = {p: p.stat().st_mtime_ns for p in (folder / "images").iterdir()}
    monkeypatch.setattr(tasks.segment, "segment_image", real)
    res = _segment(trained, *args)
    assert "(1 segmented, 2 already done)" in res.output
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # the finished images were not redone
    assert (folder / "_COMPLETE").exists()


@pytest.mark.parametrize("text, problem", [
    ("0: [sky\n", "is not valid YAML"),
    ("- sky\n- road\n", "must be a non-empty YAML mapping"),
    ("sky: 0\n", "key 'sky' is not a cluster id"),
    ("0: ''\n", "the name must be a non-empty string"),
    (f"{K}: sky\n", f"cluster {K} does not exist: the model has {K} clusters"),
])
def test_a_bad_names_file_is_one_line_naming_it_and_exit_4(trained, tmp_path, text, problem):
    names = tmp_path / "names.yaml"
    names.write_text(text)
    res = _segment(trained, "--names", names, "--out", tmp_path / "out", code=4)
    assert res.line.startswith(f"{names}: ") and problem in res.line and "\n" not in res.line
    assert not (tmp_path / "out").exists()


def test_a_bad_names_file_ends_the_process_with_exit_4_before_any_work(trained, tmp_path):
    from tests.flows.test_cli_errors import usseg

    names = tmp_path / "names.yaml"
    names.write_text("road: 1\n")
    done = usseg(tmp_path, "segment", "--model", trained["head"], "--data-root", str(trained["more"]), "--names",
                 str(names), "--storage", str(trained["storage"]))
    assert (done.returncode, done.stderr) == (4, f"error: {names}: key 'road' is not a cluster id (an integer >= 0)\n")


def test_the_segment_command_flow_and_deployments_share_one_spec():
    import typer.main
    import yaml
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    from flows.segment import segment
    from usseg_core.datasets.registry import dataset_folders
    from usseg_core.segment_spec import SegmentSpec

    options = {p.name for p in typer.main.get_command(app).commands["segment"].params}
    assert options <= set(SegmentSpec.model_fields), sorted(options - set(SegmentSpec.model_fields))
    schema = parameter_schema(segment.fn).model_dump()
    assert list(schema["properties"]) == ["spec"]
    deployments = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]
    mine = {d["name"]: d for d in deployments if d["entrypoint"] == "flows.segment.segment"}
    assert sorted(mine) == sorted(dataset_folders().values())
    for dep in mine.values():  # deployable as written (the head comes with each run) and a valid spec with one
        validate(dep["parameters"], schema, raise_on_error=True, ignore_required=True)
        SegmentSpec(**dep["parameters"]["spec"], model="0123abcd")


# --- the pages in a real browser -------------------------------------------------------------------------

def _loaded_images(page: Path, tmp: Path) -> list[int]:
    """naturalWidth of every <img> of ``page`` once Chromium has loaded it (a copy of the page with a script
    that writes them into the DOM, its relative links resolved from the page's folder)."""
    import subprocess

    from tests.flows.test_compare import CHROMIUM_FLAGS, chromium

    probe = tmp / f"probe-{page.parent.name}.html"
    script = ("<script>window.addEventListener('load',()=>{const p=document.createElement('pre');p.id='widths';"
              "p.textContent=[...document.images].map(i=>i.naturalWidth).join(',');document.body.append(p)});</script>")
    text = page.read_text().replace("<head>", f"<head><base href='{page.parent.as_uri()}/'>", 1)
    probe.write_text(text.replace("</body>", script + "</body>"))
    dom = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}",
                          "--allow-file-access-from-files", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [int(w) for w in re.search(r"<pre id=\"widths\">([\d,]*)</pre>", dom).group(1).split(",") if w]


def _screenshot(page: Path, shot: Path, tmp: Path, size: str = "1100,900") -> np.ndarray:
    import subprocess

    from tests.flows.test_compare import CHROMIUM_FLAGS, chromium

    subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}", f"--window-size={size}",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    return np.asarray(Image.open(shot).convert("RGB"))


@pytest.mark.slow  # installs chromium on a fresh machine
def test_the_gallery_and_the_index_page_show_their_pictures_in_headless_chromium(trained, tmp_path):
    """``USSEG_DOC_SCREENSHOTS=1`` also writes the screenshots docs/own-images.md shows."""
    import os

    res = _invoke("segment", "--model", trained["head"], "--data-root", trained["photos"], "--storage",
                  trained["storage"], *SEGMENT, "--out", tmp_path / "out")  # the 8 training photos
    index = Path(re.search(r"index: (\S+index\.html)", res.output).group(1))
    cells = json.loads((trained["gallery"].parent / "cells.json").read_text())
    gallery_widths = _loaded_images(trained["gallery"], tmp_path)
    assert len(gallery_widths) == len(cells) and min(gallery_widths) == 96  # every patch loaded
    for page in (index, tmp_path / "out" / "index.html"):  # in the store and in the copy
        widths = _loaded_images(page, tmp_path)
        assert len(widths) == 1 and widths[0] > 0  # the sample grid of overlays
    shots = {"own-images-gallery.png": trained["gallery"], "own-images-index.png": index}
    for name, page in shots.items():
        pic = _screenshot(page, tmp_path / name, tmp_path)
        assert len(np.unique(pic.reshape(-1, 3), axis=0)) > 2000  # photographs, not an empty page
        if os.environ.get("USSEG_DOC_SCREENSHOTS"):
            small = Image.open(tmp_path / name).convert("RGB").quantize(colors=128)
            small.save(REPO / "docs" / "images" / name, optimize=True)
