"""STEGO training speed (and OMH's per-step overhead over STEGO): steps/s reading cached features from the Zarr store (usseg) against the same
steps with the backbone in the loop (how the reference code trains: every step embeds the images and
their KNN positives), same batch, resolution, head and loss.

    python bench/train_step.py [--images 24] [--steps 10] [--batch-size 16] [--resolution 224]
        [--backbone vit_small_patch8_224.dino --random-weights] [--out FILE]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import Timer, bench_dataset, write_json  # noqa: E402


class BackboneInTheLoop:
    """A feature source that runs the backbone on the five-crop item each time it is read."""

    def __init__(self, backbone, dataset, ids, view) -> None:
        self.backbone, self.dataset, self.ids, self.view = backbone, dataset, ids, view

    def __len__(self) -> int:
        return len(self.ids) * 5

    def _crop(self, i: int):
        from usseg_core.views import prepare_item

        image = self.dataset.load_image(self.ids[i // 5])  # decode, as a data loader does
        return prepare_item(image, self.view, i % 5)

    def __getitem__(self, i: int):
        from usseg_core.features import embed

        dense, _ = embed(self.backbone, self._crop(i)[None])
        return dense[0]

    def read_batch(self, indices, out=None):
        """The step's crops (images and positives) in one backbone forward, as the reference's loop does."""
        import torch

        from usseg_core.features import embed

        dense, _ = embed(self.backbone, torch.stack([self._crop(int(i)) for i in indices]))
        if out is None:
            return dense
        out[...] = dense
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--random-weights", action="store_true",
                    help="seeded random init (same compute as the pretrained weights; e.g. ViT-S/8 offline)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    from tasks.backbone import BackboneRef, load_backbone
    from tasks.manifest import DataRef
    from usseg_core.features import FeatureStore, extract_into
    from usseg_core.heads.stego import stego_config_for
    from usseg_core.knn import mine_knn
    from usseg_core.heads.stego_train import train_stego
    from usseg_core.views import ViewSpec, prepare_item

    tmp = Path(tempfile.mkdtemp(prefix="usseg-bench-"))
    dataset, root, split = bench_dataset(tmp, args.images)
    ds = DataRef(dataset, root, split).dataset()
    ids = ds.ids()[: args.images]
    view = ViewSpec("five_crop", args.resolution)
    backbone = load_backbone(BackboneRef(args.backbone, random_weights=args.random_weights))
    side = args.resolution // backbone.stride
    store = FeatureStore.create(tmp / "f.zarr", len(ids) * 5, backbone.dim, side, side)
    with Timer() as extraction:
        extract_into(store, backbone, lambda i: prepare_item(ds.load_image(ids[i // 5]), view, i % 5),
                     range(len(ids) * 5))
    knn = mine_knn(store.pooled_all(), k=min(30, len(store) - 1))
    store.load_all()
    config = stego_config_for(dataset, steps=args.steps, batch_size=args.batch_size,
                              shifts=(0.3, 0.25, 0.3), checkpoint_every=10 ** 9, num_neighbors=7)
    train_stego(store, knn, ds.n_classes, config, progress=False, device="cpu")  # warm-up
    with Timer() as cached:
        train_stego(store, knn, ds.n_classes, config, progress=False, device="cpu")
    from usseg_core.heads.omh import OMHLoss

    with Timer() as omh:
        train_stego(store, knn, ds.n_classes, config, progress=False, device="cpu",
                    aux=OMHLoss(config.dim, ds.n_classes))
    loop = BackboneInTheLoop(backbone, ds, ids, view)
    with Timer() as online:
        train_stego(loop, knn, ds.n_classes, config, progress=False, device="cpu")
    write_json(args.out, {
        "dataset": dataset, "items": len(store), "backbone": args.backbone, "random_weights": args.random_weights,
        "resolution": args.resolution,
        "batch_size": args.batch_size, "steps": args.steps, "threads": torch.get_num_threads(),
        "one_time_extraction_s": round(extraction.seconds, 2),
        "cached_steps_per_s": round(args.steps / cached.seconds, 3),
        "backbone_in_loop_steps_per_s": round(args.steps / online.seconds, 3),
        "speedup": round(online.seconds / cached.seconds, 2),
        "omh_cached_steps_per_s": round(args.steps / omh.seconds, 3),
        "omh_step_overhead_ratio": round(omh.seconds / cached.seconds, 3),
        "note": "the backbone-in-the-loop source embeds each step's images and positives in one forward",
    })


if __name__ == "__main__":
    main()
