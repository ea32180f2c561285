"""Dataset layouts, registry and validation on tiny layouts written into tmp_path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from usseg_core.datasets import Dataset, DatasetProtocol, get_dataset, list_datasets, register_dataset
from usseg_core.datasets import registry
from usseg_core.datasets.registry import unregister_dataset
from usseg_core.errors import ConfigError, InputError

H, W = 6, 8


def _img(path: Path, seed: int = 0, h: int = H, w: int = W, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def _lab(path: Path, values, h: int = H, w: int = W) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.resize(np.asarray(values, np.uint8), (h, w))
    Image.fromarray(arr).save(path)
    return path


def _err(fn, *args, **kw) -> InputError:
    with pytest.raises(InputError) as info:
        fn(*args, **kw)
    return info.value


# ---------------------------------------------------------------- registry
def test_registry_lists_all_and_rejects_unknown(tmp_path):
    assert {"cocostuff27", "cityscapes27", "potsdam3", "camvid11", "directory", "synthetic"} <= set(list_datasets())
    with pytest.raises(ConfigError) as info:
        get_dataset("imagenet", tmp_path, "train")
    assert "imagenet" in str(info.value) and "camvid11" in str(info.value)


def test_unknown_option_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="colour"):
        get_dataset("camvid11", tmp_path, "val", colour=True)


def test_missing_root_and_split(tmp_path):
    with pytest.raises(ConfigError, match="nowhere does not exist") as info:  # a missing root: exit 3, config
        get_dataset("camvid11", tmp_path / "nowhere", "val")
    assert "--data-root" in str(info.value)
    err = _err(get_dataset, "camvid11", tmp_path, "val")
    assert str(tmp_path / "val") in str(err)


TINY_PROTOCOL = DatasetProtocol(folder=None, eval_policy="full", eval_size=None, train_policy="center_crop",
                                train_crop_resize="short_side", overseg_schedule="coco", hsg_test_grid=(6, 6),
                                retrieval_labels="valid-majority")


def test_register_dataset_decorator(tmp_path):
    @register_dataset("_test_tiny")
    class Tiny(Dataset):
        protocol = TINY_PROTOCOL

        def __init__(self, root, split):
            super().__init__(root, split)
            _img(self.root / "a.png")
            self._set_index({"a": ("a.png", None)}, False, self.root)

    try:
        ds = get_dataset("_test_tiny", tmp_path, "x")
    finally:
        unregister_dataset("_test_tiny")  # keep the global registry as other tests expect it
    assert "_test_tiny" not in list_datasets()
    assert ds.name == "_test_tiny" and ds.ids() == ["a"] and not ds.has_labels and ds.n_classes == 0
    assert ds.load_label("a") is None and ds.load_image("a").shape == (H, W, 3)


# ---------------------------------------------------------------- protocols
def test_every_dataset_declares_its_protocol_and_every_builtin_head_has_its_preset():
    """Nothing falls back silently: each registered dataset declares its own protocol (no inherited one), and
    every built-in head resolves a config for it from its own preset table; the protocol's fields reach
    the stages that read them."""
    from usseg_core.head_names import BUILTIN_HEADS
    from usseg_core.heads import get_head
    from usseg_core.overseg import SCHEDULES, schedule_for_dataset
    from usseg_core.retrieval import dataset_grid

    for name in list_datasets():
        cls = registry.dataset_class(name)
        protocol = cls.__dict__.get("protocol")
        assert isinstance(protocol, DatasetProtocol), f"{name} declares no protocol of its own"
        assert registry.dataset_protocol(name) is protocol
        assert schedule_for_dataset(name) is SCHEDULES[protocol.overseg_schedule]
        assert dataset_grid(name) == protocol.hsg_test_grid
        assert (cls.eval_policy, cls.train_policy, cls.train_crop_resize) == (
            protocol.eval_policy_name, protocol.train_policy, protocol.train_crop_resize)
        view = protocol.eval_view(None)
        assert view.policy == protocol.eval_policy and view.resolution == (protocol.eval_size or None)
        for head in BUILTIN_HEADS:
            config = get_head(head).config(name)  # raises ConfigError when the head's table lacks the dataset
            if head == "hsg":
                assert config["hsg"].test_grid == protocol.hsg_test_grid
    assert registry.dataset_folders() == {"cocostuff27": "cocostuff", "cityscapes27": "cityscapes",
                                          "potsdam3": "potsdam", "camvid11": "camvid", "synthetic": "synthetic"}


def test_eval_view_follows_the_protocol():
    from usseg_core.views import ViewSpec

    assert registry.dataset_protocol("cocostuff27").eval_view(None) == ViewSpec("center_crop", 320)
    assert registry.dataset_protocol("cocostuff27").eval_view(224) == ViewSpec("center_crop", 224)
    assert registry.dataset_protocol("camvid11").eval_view(None) == ViewSpec("full", None)
    assert registry.dataset_protocol("directory").eval_view(448) == ViewSpec("full", 448)


def test_a_dataset_without_protocol_or_preset_fails_naming_what_is_missing():
    from usseg_core.heads import get_head

    with pytest.raises(ConfigError, match="dataset '_test_bare' .*declares no protocol of its own"):
        @register_dataset("_test_bare")
        class Bare(Dataset):
            pass
    assert "_test_bare" not in list_datasets()
    with pytest.raises(TypeError, match="hsg_test_grid"):  # every field must be given: no defaults
        DatasetProtocol(folder=None, eval_policy="full", eval_size=None, train_policy="center_crop",
                        train_crop_resize="short_side", overseg_schedule="coco")
    with pytest.raises(ConfigError, match="eval_size 320: a positive side for center_crop, None for full"):
        DatasetProtocol(folder=None, eval_policy="full", eval_size=320, train_policy="center_crop",
                        train_crop_resize="short_side", overseg_schedule="coco", hsg_test_grid=(6, 6),
                        retrieval_labels="valid-majority")
    with pytest.raises(ConfigError, match="retrieval_labels 'mode': valid valid-majority, reference"):
        DatasetProtocol(folder=None, eval_policy="full", eval_size=None, train_policy="center_crop",
                        train_crop_resize="short_side", overseg_schedule="coco", hsg_test_grid=(6, 6),
                        retrieval_labels="mode")

    @register_dataset("_test_new")
    class New(Dataset):
        protocol = TINY_PROTOCOL

    try:
        for head in ("stego", "omh", "picie", "hsg"):
            with pytest.raises(ConfigError, match=f"head '{head if head != 'omh' else 'stego'}' has no preset for "
                                                  "dataset '_test_new'"):
                get_head(head).config("_test_new")
    finally:
        unregister_dataset("_test_new")


# ---------------------------------------------------------------- cocostuff27
def _coco(root: Path) -> Path:
    for i, name in enumerate(["000000000002", "000000000001", "000000000003"]):
        _img(root / "images/val2017" / f"{name}.jpg", seed=i, fmt="JPEG")
        _lab(root / "annotations/val2017" / f"{name}.png", [0, 105, 255, 181])
    (root / "curated/val2017").mkdir(parents=True)
    (root / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt").write_text("000000000002\n000000000001\n\n")
    return root


def test_cocostuff_curated_and_full(tmp_path):
    root = _coco(tmp_path / "cocostuff")
    ds = get_dataset("cocostuff27", root, "val")
    assert ds.ids() == ["000000000001", "000000000002"]
    assert ds.image_relpath("000000000001") == "images/val2017/000000000001.jpg"
    assert ds.label_relpath("000000000001") == "annotations/val2017/000000000001.png"
    assert ds.eval_policy == "center_crop_320" and ds.n_classes == 27
    np.testing.assert_array_equal(ds.load_label("000000000001").ravel()[:4], [9, 23, -1, 24])
    assert len(get_dataset("cocostuff27", root, "val", curated=False).ids()) == 3
    with pytest.raises(ConfigError, match="train, val"):
        get_dataset("cocostuff27", root, "test")
    err = _err(get_dataset, "cocostuff27", root, "val", curated_list="missing.txt")
    assert "missing.txt" in str(err)


def test_cocostuff_out_of_range_label_names_file(tmp_path):
    root = _coco(tmp_path / "cocostuff")
    _lab(root / "annotations/val2017/000000000002.png", [3, 200])
    err = _err(get_dataset("cocostuff27", root, "val").load_label, "000000000002")
    assert "000000000002.png" in str(err) and "200" in str(err)


def test_curated_list_with_escaping_id_is_refused(tmp_path):
    root = _coco(tmp_path / "cocostuff")
    (root / "curated/val2017/evil.txt").write_text("../../etc/passwd\n")
    err = _err(get_dataset, "cocostuff27", root, "val", curated_list="evil.txt")
    assert "evil.txt" in str(err)


# ---------------------------------------------------------------- cityscapes27
def test_cityscapes_layout_and_mapping(tmp_path):
    root = tmp_path / "cityscapes"
    for city, n in (("bonn", 1), ("aachen", 2)):
        for k in range(n):
            base = f"{city}_000000_00001{k}"
            _img(root / "leftImg8bit/val" / city / f"{base}_leftImg8bit.png", seed=k)
            _lab(root / "gtFine/val" / city / f"{base}_gtFine_labelIds.png", [0, 6, 7, 23, 33])
            (root / "gtFine/val" / city / f"{base}_gtFine_color.png").write_bytes(b"x")  # ignored
    ds = get_dataset("cityscapes27", root, "val")
    assert ds.ids() == ["aachen/aachen_000000_000010", "aachen/aachen_000000_000011", "bonn/bonn_000000_000010"]
    assert ds.label_relpath(ds.ids()[2]) == "gtFine/val/bonn/bonn_000000_000010_gtFine_labelIds.png"
    np.testing.assert_array_equal(ds.load_label(ds.ids()[0]).ravel()[:5], [-1, -1, 0, 16, 26])
    _lab(root / "gtFine/val/bonn/bonn_000000_000010_gtFine_labelIds.png", [34])
    err = _err(ds.check, "bonn/bonn_000000_000010")
    assert "bonn_000000_000010_gtFine_labelIds.png" in str(err)


# ---------------------------------------------------------------- potsdam3
def _potsdam(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(4):
        (root / "imgs").mkdir(parents=True, exist_ok=True)
        (root / "gt").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(root / "imgs" / f"{i}.mat", {"img": rng.random((H, W, 4)).astype(np.float32)})
        if i < 3:
            scipy.io.savemat(root / "gt" / f"{i}.mat", {"gt": np.resize(np.array([0, 1, 2, 3, 4, 5, 255], np.uint8), (H, W))})
    (root / "labelled_train.txt").write_text("0\n1\n")
    (root / "unlabelled_train.txt").write_text("3\n")
    (root / "labelled_test.txt").write_text("2\n")
    return root


def test_potsdam_mat_layout(tmp_path):
    root = _potsdam(tmp_path / "potsdam")
    ds = get_dataset("potsdam3", root, "train")
    assert ds.ids() == ["0", "1"] and ds.n_classes == 3 and ds.eval_policy == "center_crop_320"
    img = ds.load_image("0")
    raw = scipy.io.loadmat(root / "imgs/0.mat")["img"]
    np.testing.assert_array_equal(img, np.rint(raw[..., :3] * 255).astype(np.uint8))
    np.testing.assert_array_equal(ds.load_label("0").ravel()[:7], [0, 1, 2, 2, 0, 1, -1])
    full = get_dataset("potsdam3", root, "train", include_unlabelled=True)
    assert full.ids() == ["0", "1", "3"] and full.load_label("3") is None and full.label_relpath("3") is None
    assert get_dataset("potsdam3", root, "val").ids() == ["2"]


def test_potsdam_unknown_value_is_error_not_zero(tmp_path):
    root = _potsdam(tmp_path / "potsdam")
    scipy.io.savemat(root / "gt/1.mat", {"gt": np.full((H, W), 6, np.uint8)})
    err = _err(get_dataset("potsdam3", root, "train").load_label, "1")
    assert "1.mat" in str(err) and "6" in err.problem


# ---------------------------------------------------------------- camvid11
def _camvid(root: Path) -> Path:
    for split, stems in (("train", ["0001TP_006690", "0001TP_006720"]), ("val", ["0016E5_07959"])):
        for k, stem in enumerate(stems):
            _img(root / split / "images" / f"{stem}.jpg", seed=k, fmt="JPEG")
            _lab(root / split / "labels" / f"{stem}.png", [0, 10, 11, 3])
    return root


def test_camvid_splits_and_trainval(tmp_path):
    root = _camvid(tmp_path / "camvid")
    ds = get_dataset("camvid11", root, "train")
    assert ds.ids() == ["0001TP_006690", "0001TP_006720"] and ds.eval_policy == "full"
    assert ds.class_names[0] == "sky" and ds.n_classes == 11
    np.testing.assert_array_equal(ds.load_label("0001TP_006690").ravel()[:4], [0, 10, -1, 3])
    tv = get_dataset("camvid11", root, "trainval")
    assert tv.ids() == ["train/0001TP_006690", "train/0001TP_006720", "val/0016E5_07959"]
    assert tv.image_relpath("val/0016E5_07959") == "val/images/0016E5_07959.jpg"
    assert tv.load_image("val/0016E5_07959").shape == (H, W, 3)


def test_size_mismatch_names_label(tmp_path):
    root = _camvid(tmp_path / "camvid")
    _lab(root / "val/labels/0016E5_07959.png", [1], h=H + 1, w=W)
    ds = get_dataset("camvid11", root, "val")
    for fn in (ds.load_label, ds.check):
        err = _err(fn, "0016E5_07959")
        assert "0016E5_07959.png" in str(err) and "differs" in err.problem


def test_camvid_out_of_range_and_missing_label(tmp_path):
    root = _camvid(tmp_path / "camvid")
    _lab(root / "train/labels/0001TP_006690.png", [12])
    ds = get_dataset("camvid11", root, "train")
    assert "0001TP_006690.png" in str(_err(ds.check, "0001TP_006690"))
    (root / "train/labels/0001TP_006720.png").unlink()
    assert "0001TP_006720.png" in str(_err(ds.check, "0001TP_006720"))


def test_empty_split_folder(tmp_path):
    (tmp_path / "camvid/val/images").mkdir(parents=True)
    err = _err(get_dataset, "camvid11", tmp_path / "camvid", "val")
    assert "images" in str(err) and "no images" in err.problem


def test_corrupt_image_check_names_file(tmp_path):
    root = _camvid(tmp_path / "camvid")
    (root / "val/images/0016E5_07959.jpg").write_text("not a jpeg")
    assert "0016E5_07959.jpg" in str(_err(get_dataset("camvid11", root, "val").check, "0016E5_07959"))


# ---------------------------------------------------------------- directory
def test_directory_flat_folder_mixed_extensions(tmp_path):
    _img(tmp_path / "b.PNG")
    _img(tmp_path / "a.jpeg", fmt="JPEG")
    _img(tmp_path / "c.webp", fmt="WEBP")
    _img(tmp_path / "d.tif", fmt="TIFF")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    _img(tmp_path / "sub" / "e.png")  # non-recursive: not listed
    ds = get_dataset("directory", tmp_path, "all")
    assert ds.ids() == ["a", "b", "c", "d"] and not ds.has_labels and ds.class_names == ()
    assert ds.eval_policy == "full" and ds.image_relpath("b") == "b.PNG"
    assert ds.load_image("c").shape == (H, W, 3)


def test_directory_split_images_labels_classes(tmp_path):
    _img(tmp_path / "val/images/x.jpg", fmt="JPEG")
    _lab(tmp_path / "val/labels/x.png", [0, 2, 255])
    (tmp_path / "val/classes.txt").write_text("cell\nbackground\nmembrane\n")
    ds = get_dataset("directory", tmp_path, "val")
    assert ds.class_names == ("cell", "background", "membrane") and ds.has_labels
    np.testing.assert_array_equal(ds.load_label("x").ravel()[:3], [0, 2, -1])
    _lab(tmp_path / "val/labels/x.png", [3])
    assert "x.png" in str(_err(ds.load_label, "x"))
    with pytest.raises(ConfigError, match="n_classes"):
        get_dataset("directory", tmp_path, "val", n_classes=5)


def test_directory_layout_fallbacks(tmp_path):
    _img(tmp_path / "train/t.png")  # images directly in the split folder
    _img(tmp_path / "images/r.png")  # root/images for "all" and missing splits
    assert get_dataset("directory", tmp_path, "train").ids() == ["t"]
    assert get_dataset("directory", tmp_path, "all").ids() == ["r"]
    assert get_dataset("directory", tmp_path, "test").ids() == ["r"]


def test_directory_labels_need_class_count(tmp_path):
    _img(tmp_path / "images/x.png")
    _lab(tmp_path / "labels/x.png", [1])
    with pytest.raises(ConfigError, match="classes.txt"):
        get_dataset("directory", tmp_path, "all")
    ds = get_dataset("directory", tmp_path, "all", n_classes=2)
    assert ds.class_names == ("class_0", "class_1") and ds.load_label("x").max() == 1
    assert not get_dataset("directory", tmp_path, "all", use_labels=False).has_labels


def test_directory_empty_folder_names_it(tmp_path):
    (tmp_path / "empty").mkdir()
    err = _err(get_dataset, "directory", tmp_path / "empty", "all")
    assert "empty" in str(err.path) and "no images" in err.problem
