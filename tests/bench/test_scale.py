"""bench/scale.py writes stores and view banks in the real formats, and its ratios are the ones it prints."""
from __future__ import annotations

import numpy as np

from bench.scale import GridSegments, _summaries, write_bank, write_store
from usseg_core.features import FeatureStore
from usseg_core.heads.hsg_train import view_regions
from usseg_core.viewbank import ViewBank


def test_synthetic_store_and_bank_are_readable_in_the_real_formats(tmp_path):
    write_store(tmp_path / "f.zarr", 16, 8, 4)
    store = FeatureStore(tmp_path / "f.zarr")
    assert store.is_complete() and store.shape == (16, 8, 4, 4)
    maps = store.read_batch(range(16))
    assert len({m.tobytes() for m in maps}) == 16  # every chunk differs: every read decodes
    write_bank(tmp_path / "bank", tmp_path / "f.zarr", 16, 4)
    bank = ViewBank(tmp_path / "bank")
    assert bank.n_images == 4 and bank.n_views == 4 and bank.shape == (8, 4, 4)
    assert np.array_equal(bank.plain_batch([1], 2)[0].numpy(), maps[6].astype(np.float32))
    regions = view_regions([bank], [GridSegments(4, 32)], (4, 4))
    assert regions.shape == (4, 4, 4, 4) and int(regions.max()) < 64


def test_summaries_are_ratios_of_the_rows():
    rows = [{"head": "stego", "n": n, "mode": mode, "steps_per_s": sps, "peak_rss_mib": rss}
            for n, mode, sps, rss in [(100, "in-memory", 2.0, 900), (100, "streamed", 1.8, 500),
                                      (400, "streamed", 1.7, 550)]]
    out = _summaries(rows, [100, 400])
    assert out[0] == {"head": "stego", "n": 100, "streamed_vs_in_memory_steps": 0.9}
    assert out[1]["streamed_rss_growth"] == 1.1 and out[1]["vs_n"] == 100
