"""`usseg data check` (usseg_core/datasets/check.py, commands/data.py): small trees of every layout, the classic
mistakes each named on one line, sampling, counts against the published ones, the CLI's exit code and table,
and the real CamVid copy (when present) passing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from usseg_core.datasets.check import DEFAULT_SAMPLE, ERROR, EXPECTED, WARNING, check_data
from usseg_core.datasets.registry import list_datasets

H, W = 6, 8
CAMVID = Path(__file__).resolve().parents[3] / "shared" / "data" / "camvid"


def _img(path: Path, h: int = H, w: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(path)


def _lab(path: Path, values, h: int = H, w: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.resize(np.asarray(values, np.uint8), (h, w))).save(path)


def _camvid(root: Path, n: int = 3, values=(0, 3, 11)) -> Path:
    for split in ("train", "val"):
        for i in range(n):
            _img(root / split / "images" / f"f{i}.png")
            _lab(root / split / "labels" / f"f{i}.png", values)
    return root


def _cityscapes(root: Path, values=(7, 8, 0, 33), suffix="_gtFine_labelIds.png") -> Path:
    for split in ("train", "val"):
        for i in range(2):
            base = f"aachen/aachen_000000_00000{i}"
            _img(root / "leftImg8bit" / split / f"{base}_leftImg8bit.png")
            _lab(root / "gtFine" / split / f"{base}{suffix}", values)
    return root


def _coco(root: Path, values=(0, 100, 181, 255), lists=True) -> Path:
    for folder in ("train2017", "val2017"):
        ids = [f"{folder}_{i:02d}" for i in range(3)]
        for i in ids:
            _img(root / "images" / folder / f"{i}.jpg")
            _lab(root / "annotations" / folder / f"{i}.png", values)
        if lists:
            (root / "curated" / folder).mkdir(parents=True)
            (root / "curated" / folder / "Coco164kFull_Stuff_Coarse_7.txt").write_text("\n".join(ids[:2]) + "\n")
    return root


def _potsdam(root: Path) -> Path:
    import scipy.io

    (root / "imgs").mkdir(parents=True)
    (root / "gt").mkdir()
    for i in range(4):
        scipy.io.savemat(root / "imgs" / f"{i}.mat", {"img": np.zeros((H, W, 4), np.float32)})
        scipy.io.savemat(root / "gt" / f"{i}.mat", {"gt": np.resize(np.array([0, 1, 2, 3, 4, 5, 255], np.uint8),
                                                                    (H, W))})
    (root / "labelled_train.txt").write_text("0\n1\n")
    (root / "labelled_test.txt").write_text("2\n3\n")
    return root


def _directory(root: Path, labelled: bool = True) -> Path:
    for i in range(3):
        _img(root / "images" / f"im{i}.png")
        if labelled:
            _lab(root / "labels" / f"im{i}.png", (0, 1, 255))
    if labelled:
        (root / "classes.txt").write_text("a\nb\n")
    return root


def _kinds(report, severity=ERROR) -> list[str]:
    return [p.kind for p in report.problems if p.severity == severity]


def test_every_registered_dataset_has_its_published_release():
    """No silent fallback: a dataset added to the registry needs its row (counts, splits) in EXPECTED."""
    assert set(list_datasets()) <= set(EXPECTED), sorted(set(list_datasets()) - set(EXPECTED))


@pytest.mark.parametrize("name, build", [("camvid11", _camvid), ("cityscapes27", _cityscapes),
                                         ("cocostuff27", _coco), ("potsdam3", _potsdam), ("directory", _directory)])
def test_each_layout_passes_with_its_counts_and_values(tmp_path, name, build):
    report = check_data(name, build(tmp_path / name))
    assert report.errors == [], report.lines()
    expected = EXPECTED[name]
    assert [s.split for s in report.splits] == [s for s in expected.splits if s not in expected.optional]
    for s in report.splits:
        assert s.images == s.labels == s.labels_read > 0 and s.classes_seen
    # tiny trees differ from every published count: one warning per split, never an error
    counted = [s for s in report.splits if s.published is not None]
    assert _kinds(report, WARNING).count("count") == len(counted)
    assert all("a subset or another release" in p.problem for p in report.warnings if p.kind == "count")


def test_void_values_are_reported_per_mapping(tmp_path):
    camvid = check_data("camvid11", _camvid(tmp_path / "c"))
    assert camvid.splits[0].void_values == (11,) and camvid.splits[0].void_fraction == pytest.approx(16 / 48)
    assert camvid.splits[0].classes_seen == (0, 3)
    city = check_data("cityscapes27", _cityscapes(tmp_path / "cs"))
    assert city.splits[0].void_values == (0,) and city.splits[0].classes_seen == (0, 1, 26)
    coco = check_data("cocostuff27", _coco(tmp_path / "coco"))
    assert coco.splits[0].void_values == (255,) and coco.splits[0].images == 2  # the curated list's two


def test_missing_curated_list_is_one_line_naming_it(tmp_path):
    root = _coco(tmp_path / "coco", lists=False)
    report = check_data("cocostuff27", root)
    lists = [root / "curated" / f / "Coco164kFull_Stuff_Coarse_7.txt" for f in ("train2017", "val2017")]
    assert [p.path for p in report.errors] == lists and _kinds(report) == ["layout", "layout"]
    assert report.lines()[-1] == (f"error: {lists[1]}: split list file does not exist (split val): the curated lists "
                                  "come with STEGO's cocostuff download (curated/train2017, curated/val2017); "
                                  "dataset_options {\"curated\": false} reads every image")


def test_cityscapes_trainids_files_instead_of_labelids(tmp_path):
    root = _cityscapes(tmp_path / "cs", values=(0, 18, 255), suffix="_gtFine_labelTrainIds.png")
    report = check_data("cityscapes27", root, ["train"])
    assert _kinds(report) == ["other-label-files"]
    line = report.errors[0]
    assert line.path == root / "gtFine" / "train" / "aachen"
    assert ("2 images of split train have no *_gtFine_labelIds.png label but a *_gtFine_labelTrainIds.png"
            in line.problem)
    assert "cityscapes27 reads labelIds (0-33" in line.problem


def test_cityscapes_trainids_values_under_labelids_names(tmp_path):
    root = _cityscapes(tmp_path / "cs", values=(0, 5, 18, 255))
    report = check_data("cityscapes27", root, ["val"])
    assert _kinds(report) == ["label", "label", "other-dataset"]
    assert "label values {255} are outside the cityscapes27 mapping" in report.errors[0].problem
    assert report.errors[0].path.name == "aachen_000000_000000_gtFine_labelIds.png"
    assert "they fit Cityscapes trainIds (0-18, 255): cityscapes27 reads labelIds" in report.errors[-1].problem


def test_another_datasets_folder_is_named(tmp_path):
    root = _cityscapes(tmp_path / "cs")
    report = check_data("camvid11", root)
    assert report.splits == () and report.errors[-1].kind == "other-layout" and report.errors[-1].path == root
    assert report.errors[-1].problem == ("no split of camvid11 found; the folder has the layout of cityscapes27 "
                                         "(--dataset cityscapes27?)")


def test_cocostuff_labels_given_to_cityscapes_and_camvid(tmp_path):
    city = check_data("cityscapes27", _cityscapes(tmp_path / "cs", values=(0, 40, 150, 255)), ["train"])
    assert "they fit COCO-Stuff stuffthingmaps (cocostuff27) (0-181, 255): labels of another dataset?" \
        in city.errors[-1].problem
    camvid = check_data("camvid11", _camvid(tmp_path / "cv", values=(0, 26, 33)), ["val"])
    assert "they fit Cityscapes labelIds (cityscapes27) (0-33)" in camvid.errors[-1].problem


def test_a_split_with_images_and_no_labels(tmp_path):
    root = _camvid(tmp_path / "cv")
    for f in (root / "val" / "labels").iterdir():
        f.unlink()
    (root / "val" / "labels").rmdir()
    report = check_data("camvid11", root)
    assert _kinds(report) == ["unlabelled"] and report.errors[0].path == root / "val" / "labels"
    assert "split val has 3 images and no labels" in report.errors[0].problem
    # a user's folder without labels is fine; a run's evaluation split is not
    plain = _directory(tmp_path / "d", labelled=False)
    assert check_data("directory", plain).errors == [] and check_data("directory", plain).splits[0].labels is None
    assert check_data("camvid11", root, ["val"], labelled=[]).errors == []


def test_pairing_images_without_labels_and_labels_without_images(tmp_path):
    root = _camvid(tmp_path / "cv")
    (root / "train" / "labels" / "f1.png").unlink()
    _lab(root / "train" / "labels" / "ghost.png", (0,))
    report = check_data("camvid11", root, ["train"])
    assert [(p.severity, p.kind, p.path.name) for p in report.problems if p.kind != "count"] == [
        (ERROR, "missing-label", "f1.png"), (WARNING, "orphan-label", "ghost.png")]
    assert report.lines()[-1] == (f"error: {root / 'train/labels/f1.png'}: label file does not exist (the image "
                                  "train/images/f1.png has no label; add it, or pass --on-error skip to leave the "
                                  "image out)")
    # under --on-error skip the run leaves the image out: a warning
    assert check_data("camvid11", root, ["train"], skip_invalid=True).errors == []


def test_listed_image_missing_and_label_size(tmp_path):
    root = _coco(tmp_path / "coco")
    (root / "images" / "val2017" / "val2017_01.jpg").unlink()
    _lab(root / "annotations" / "train2017" / "train2017_00.png", (0,), h=H + 1)
    report = check_data("cocostuff27", root)
    assert sorted(_kinds(report)) == ["missing-image", "size"]
    assert "label size 8x7 (WxH) differs from its image images/train2017/train2017_00.jpg size 8x6" in \
        next(p.problem for p in report.errors if p.kind == "size")


def test_labels_are_sampled_evenly_and_all_reads_every_one(tmp_path):
    root = _camvid(tmp_path / "cv", n=9)
    _lab(root / "train" / "labels" / "f1.png", (0, 200))  # not among 3 evenly spaced of 9 (0, 4, 8)
    sampled = check_data("camvid11", root, ["train"], sample=3)
    assert sampled.splits[0].labels_read == 3 and sampled.errors == []
    full = check_data("camvid11", root, ["train"], sample=None)
    assert full.splits[0].labels_read == 9 and _kinds(full) == ["label"]
    assert DEFAULT_SAMPLE == 100


def test_many_problems_of_a_kind_are_capped_with_one_more_line(tmp_path):
    root = tmp_path / "cv"
    for i in range(14):
        _img(root / "train" / "images" / f"f{i:02d}.png")
    (root / "train" / "labels").mkdir()
    _lab(root / "train" / "labels" / "f00.png", (1,))
    report = check_data("camvid11", root, ["train"])
    missing = [p for p in report.errors if p.kind == "missing-label"]
    assert len(missing) == 11 and missing[-1].problem == "3 more images without labels (the first 10 above)"
    assert missing[-1].path == root / "train" / "labels"


def test_missing_optional_split_is_a_warning_and_an_asked_one_an_error(tmp_path):
    root = _camvid(tmp_path / "cv")
    report = check_data("camvid11", root)
    assert report.errors == [] and "absent-split" in _kinds(report, WARNING)
    assert _kinds(check_data("camvid11", root, ["test"])) == ["layout"]


def test_counts_against_published_only_with_default_options(tmp_path):
    root = _coco(tmp_path / "coco")
    assert [s.published for s in check_data("cocostuff27", root).splits] == [49_629, 2_175]
    full = check_data("cocostuff27", root, options={"curated": False})
    assert [s.published for s in full.splits] == [None, None] and [s.images for s in full.splits] == [3, 3]


def _cli(*args: str):
    from commands.cli import app

    return CliRunner().invoke(app, ["data", "check", *args])


def test_cli_exits_4_with_the_line_naming_the_file(tmp_path):
    root = _camvid(tmp_path / "cv")
    _lab(root / "val" / "labels" / "f2.png", (0, 40))
    res = _cli("--dataset", "camvid11", "--data-root", str(root), "--split", "val")
    assert res.exit_code == 4, res.output
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {root / 'val/labels/f2.png'}: label values {{40}} are outside the camvid11")
    assert "classes" not in res.stdout  # no table when something is wrong


def test_cli_all_good_prints_the_summary(tmp_path):
    root = _camvid(tmp_path / "cv")
    res = _cli("--dataset", "camvid11", "--data-root", str(root), "--split", "train,val", "--all")
    assert res.exit_code == 0, res.output
    assert "camvid11 in" in res.stdout and "labels read: every label" in res.stdout
    assert "void (ignored): 11" in res.stdout
    assert [line.split(":")[0] for line in res.stderr.splitlines()] == ["warning", "warning"]  # the two counts


def test_run_and_compare_stop_on_the_check_before_any_work(tmp_path, capsys):
    from commands.common import check_data_layout
    from usseg_core.errors import InputError
    from usseg_core.spec import CompareSpec, RunSpec, build

    root = _camvid(tmp_path / "cv")
    (root / "val" / "labels" / "f0.png").unlink()
    _lab(root / "train" / "labels" / "ghost.png", (0,))
    run = build(RunSpec, head="stego", dataset="camvid11", data_root=str(root), storage=str(tmp_path / "s"))
    with pytest.raises(InputError) as err:
        check_data_layout(run)
    assert str(err.value) == (f"{root / 'val/labels/f0.png'}: label file does not exist (the image val/images/f0.png "
                              "has no label; add it, or pass --on-error skip to leave the image out)")
    assert "warning: " in capsys.readouterr().err  # the orphan and the counts, printed, not fatal
    compare = build(CompareSpec, dataset="camvid11", data_root=str(root), heads=["stego"], seeds=[0],
                    on_error="skip", storage=str(tmp_path / "s"))
    check_data_layout(compare)  # under --on-error skip the image is left out: warnings only
    check_data_layout(build(RunSpec, head="stego", dataset="synthetic", storage=str(tmp_path / "s")))


@pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid absent")
def test_the_shared_camvid_copy_passes():
    report = check_data("camvid11", CAMVID)
    assert report.errors == [], report.lines()
    assert {s.split: s.images for s in report.splits} == {"train": 367, "val": 101}
    assert all(s.void_values == (11,) and len(s.classes_seen) == 11 for s in report.splits)
