"""Label mappings against docs/references.md §2, value by value."""
from __future__ import annotations

import numpy as np
import pytest

from usseg_core.datasets import mappings as m
from usseg_core.errors import InputError

# docs/references.md §2.1, written out independently of the module's table: coarse id -> fine ids.
COCO_REFERENCE = {
    0: range(71, 77), 1: range(77, 83), 2: range(51, 61), 3: range(61, 71), 4: range(83, 91),
    5: range(43, 51), 6: range(25, 33), 7: range(15, 25), 8: range(9, 15), 9: [0], 10: range(33, 43),
    11: range(1, 9), 12: [101, 102], 13: [100, 113, 114, 115, 116, 117], 14: [120, 121, 152, 169],
    15: [97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164], 16: [99, 131, 138, 142],
    17: [91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167], 18: range(170, 177), 19: [179, 180],
    20: [94, 95, 127, 150, 157, 165], 21: [110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158],
    22: [93, 96, 118, 123, 128, 133, 141, 162, 168], 23: [105, 156], 24: [126, 134, 149, 159, 161, 181],
    25: [98, 112, 137, 145, 163], 26: [119, 147, 154, 177, 178],
}


def test_cocostuff_fine_count_per_coarse_class():
    counts = np.bincount(np.array(m.COCOSTUFF_FINE_TO_COARSE), minlength=27)
    expected = [6, 6, 10, 10, 8, 8, 8, 10, 6, 1, 10, 8, 2, 6, 4, 11, 4, 11, 7, 2, 6, 11, 9, 2, 6, 5, 5]
    assert counts.tolist() == expected
    assert len(m.COCOSTUFF_FINE_TO_COARSE) == 182 and sum(expected) == 182


def test_cocostuff_table_matches_reference_rows():
    for coarse, fines in COCO_REFERENCE.items():
        for fine in fines:
            assert m.COCOSTUFF_FINE_TO_COARSE[fine] == coarse, (fine, coarse)


def test_cocostuff_apply_and_ignore():
    raw = np.array([[0, 1, 255], [105, 181, 156]])
    out = m.COCOSTUFF27.apply(raw, "x.png")
    np.testing.assert_array_equal(out, [[9, 11, -1], [23, 24, 23]])  # person, vehicle, ignore / sky, solid, sky
    assert out.dtype == np.int64
    assert m.COCOSTUFF27_CLASS_NAMES[9] == "person" and m.COCOSTUFF27_CLASS_NAMES[23] == "sky"
    assert len(m.COCOSTUFF27_CLASS_NAMES) == 27


@pytest.mark.parametrize("bad", [182, 254, 256, -1])
def test_cocostuff_rejects_values_outside(bad):
    with pytest.raises(InputError) as info:
        m.COCOSTUFF27.apply(np.array([[0, bad]]), "anns/000000000139.png")
    assert "000000000139.png" in str(info.value) and str(bad) in str(info.value)


def test_cityscapes_minus_seven():
    raw = np.arange(34).reshape(2, 17)
    out = m.CITYSCAPES27.apply(raw, "c.png").ravel()
    assert (out[:7] == -1).all()
    np.testing.assert_array_equal(out[7:], np.arange(27))
    assert m.CITYSCAPES27_CLASS_NAMES[0] == "road" and m.CITYSCAPES27_CLASS_NAMES[26] == "bicycle"
    assert m.CITYSCAPES27_CLASS_NAMES[16] == "sky" and len(m.CITYSCAPES27_CLASS_NAMES) == 27
    with pytest.raises(InputError, match="c.png"):
        m.CITYSCAPES27.apply(np.array([[34]]), "c.png")


def test_potsdam_three_classes():
    raw = np.array([[0, 1, 2, 3, 4, 5, 255]])
    np.testing.assert_array_equal(m.POTSDAM3.apply(raw, "gt.mat"), [[0, 1, 2, 2, 0, 1, -1]])
    for bad in (6, 7, 254):
        with pytest.raises(InputError, match="gt.mat"):
            m.POTSDAM3.apply(np.array([[bad]]), "gt.mat")


def test_camvid_void_and_range():
    raw = np.arange(12)[None]
    np.testing.assert_array_equal(m.CAMVID11.apply(raw, "l.png"), [list(range(11)) + [-1]])
    assert m.CAMVID11.n_classes == 11
    with pytest.raises(InputError, match="l.png"):
        m.CAMVID11.apply(np.array([[12]]), "l.png")


def test_error_lists_valid_values():
    with pytest.raises(InputError) as info:
        m.POTSDAM3.apply(np.array([[9]]), "gt.mat")
    assert "0-5, 255" in info.value.problem


def test_identity_mapping_checks_collisions():
    mp = m.identity_mapping("d", 3)
    np.testing.assert_array_equal(mp.apply(np.array([[0, 2, 255]]), "a"), [[0, 2, -1]])
    with pytest.raises(ValueError):
        m.identity_mapping("d", 12, ignore_values=(11,))
