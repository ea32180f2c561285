"""Edge registry, EdgeMap contract, classical detector, orientation and NMS."""
from __future__ import annotations

import numpy as np
import pytest

from usseg_core.edges import BUILTIN_DETECTORS, EdgeMap, get_edge_detector, list_edge_detectors
from usseg_core.edges.orientation import edge_nms, ridge_tangent
from usseg_core.errors import ConfigError, WeightsError


def _step_image(vertical: bool = True) -> np.ndarray:
    img = np.zeros((40, 50, 3), np.uint8)
    if vertical:
        img[:, 25:] = (200, 60, 30)
    else:
        img[20:] = (200, 60, 30)
    return img


def test_registry_lists_all_and_rejects_unknown():
    names = list_edge_detectors()
    assert {"pidinet", "pidinet-tiny", "classical", "hed", "sed"} <= set(names)
    assert set(BUILTIN_DETECTORS) == set(names)  # the torch-free list the CLI help shows
    with pytest.raises(ConfigError, match="known: .*classical"):
        get_edge_detector("canny-9000")


@pytest.mark.parametrize("name", ["pidinet", "pidinet-tiny", "hed", "sed"])
def test_learned_detectors_need_weights(name, tmp_path):
    with pytest.raises(WeightsError, match=name):
        get_edge_detector(name)
    with pytest.raises(WeightsError, match="does not exist"):
        get_edge_detector(name, weights=tmp_path / "missing.bin")


def test_classical_contract_and_step_location():
    det = get_edge_detector("classical")
    e = det(_step_image())
    assert isinstance(e, EdgeMap)
    assert e.strength.shape == e.orientation.shape == (40, 50)
    assert e.strength.dtype == np.float32 and e.orientation.dtype == np.float32
    assert e.strength.min() >= 0 and e.strength.max() <= 1
    assert e.orientation.min() >= 0 and e.orientation.max() < np.pi
    col = e.strength[20]
    assert set(np.argsort(col)[-2:]) == {24, 25}  # the ridge straddles the colour step
    assert col[5] < 1e-3 and col[45] < 1e-3  # flat areas have no edge
    # vertical edge -> tangent pi/2 (rows direction)
    assert abs(e.orientation[20, 24] - np.pi / 2) < 0.05
    eh = det(_step_image(vertical=False))
    d = min(eh.orientation[19, 25], np.pi - eh.orientation[19, 25])
    assert d < 0.05  # horizontal edge -> tangent 0 (mod pi)


def test_classical_rejects_bad_images():
    det = get_edge_detector("classical")
    with pytest.raises(ConfigError, match="uint8"):
        det(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ConfigError, match=r"\(H, W, 3\)"):
        det(np.zeros((8, 8), np.uint8))


def test_classical_fingerprint_is_stable_and_parameter_dependent():
    from usseg_core.edges.classical import ClassicalConfig, ClassicalDetector

    assert ClassicalDetector().fingerprint == get_edge_detector("classical").fingerprint
    assert ClassicalDetector(ClassicalConfig(g0=3.0)).fingerprint != ClassicalDetector().fingerprint


@pytest.mark.parametrize("angle_deg", [0, 30, 45, 90, 135])
def test_ridge_tangent_of_a_straight_line(angle_deg):
    h = w = 61
    yy, xx = np.mgrid[0:h, 0:w].astype(float) - 30
    a = np.deg2rad(angle_deg)
    dist = np.abs(-np.sin(a) * xx + np.cos(a) * yy)  # distance to the line along (cos a, sin a)
    s = np.exp(-(dist**2) / 2.0)
    th = ridge_tangent(s, 2.0)[30, 30]
    err = abs((th - a + np.pi / 2) % np.pi - np.pi / 2)
    assert err < 0.02


def test_nms_keeps_only_the_ridge_crest():
    x = np.arange(21, dtype=float)
    s = np.tile(np.exp(-((x - 10) ** 2) / 8.0), (15, 1)).astype(np.float32)  # vertical ridge at col 10
    o = np.full_like(s, np.pi / 2)
    out = edge_nms(s, o, border=0)
    assert np.all(np.nonzero(out)[1] == 10)
    assert out[:, 10].min() == pytest.approx(1.0)
