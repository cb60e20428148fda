"""RetrievalMetricsCallback: its share of ``fit`` wall time at the default cadence, and one check vs a plain loop.

1. ``fit`` of a small ``models.mocov3.MoCoV3Module`` on procedural images for ``--epochs``
   epochs with the callback checking every epoch (the default) on a procedural
   copy-detection set: total wall time, time inside the checks (the callback's own
   clock), and their share.
2. One check of the trained model through the callback (``evaluate``: sharded embed,
   gather, ``lit.search``, ``RetrievalMetrics``) vs a plain loop doing the same work
   by hand (DataLoader over stacked images, descriptor forward, one cosine matrix,
   ``argsort``, AP / Recall@1 / MRR in numpy): times side by side, values equal to 1e-6.

Peak memory: the process's peak RSS after each part (ru_maxrss; it only grows).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_retrieval_callback.py            # ~2-4 min on 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_retrieval_callback.py --epochs 2 --queries 30
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.retrieval import RetrievalMetricsCallback  # noqa: E402
from datamodules.images import ProceduralTrainData  # noqa: E402
from datamodules.retrieval import ProceduralRetrievalDataModule  # noqa: E402
from models.mocov3 import MoCoV3Module  # noqa: E402

MODEL = dict(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=96, num_heads=3,
             proj_hidden_dim=256, proj_dim=64, warmup_epochs=0.5, lr=1e-3)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plain_check(module: MoCoV3Module, retrieval_set, batch_size: int) -> dict[str, float]:
    """The same evaluation by hand: embed, one cosine matrix, argsort, numpy metrics."""
    descriptor = module.descriptor.eval()

    def embed(dataset) -> np.ndarray:
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=lambda b: torch.stack([x["image"] for x in b]))
        with torch.no_grad():
            return torch.cat([descriptor(images) for images in loader]).double().numpy()

    queries, gallery = embed(retrieval_set.queries), embed(retrieval_set.gallery)
    scores = queries @ gallery.T
    order = np.lexsort((np.broadcast_to(np.arange(gallery.shape[0]), scores.shape), -scores), axis=1)
    aps, recall1, rr = [], [], []
    for q, positives in enumerate(retrieval_set.positives):
        ranked = np.isin(order[q], positives)
        ranks = np.flatnonzero(ranked) + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        recall1.append(ranked[:1].sum() / len(positives))
        rr.append(1.0 / ranks[0])
    return {"mAP": float(np.mean(aps)), "recall@1": float(np.mean(recall1)), "MRR": float(np.mean(rr))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train_images", type=int, default=256)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--distractors", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()
    pl.seed_everything(0)
    retrieval = ProceduralRetrievalDataModule(num_queries=args.queries, copies_per_query=3,
                                              num_distractors=args.distractors, image_size=64)
    callback = RetrievalMetricsCallback(retrieval, ks=[1, 5, 10], batch_size=args.batch_size, verbose=False)
    module = MoCoV3Module(**MODEL)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback])
    data = ProceduralTrainData(num_images=args.train_images, resolution=32, random_crop=False, random_flip=False,
                               batch_size=args.batch_size)
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - started
    checks = sum(row["seconds"] for row in callback.history)
    gallery = len(retrieval.retrieval_set.gallery)
    print(f"1. fit: {args.epochs} epochs of {args.train_images} images, a check per epoch "
          f"({args.queries} queries, {gallery} gallery images)")
    print(f"   wall {wall:.1f}s, checks {checks:.1f}s = {100 * checks / wall:.1f}% of wall; "
          f"mAP per epoch: {', '.join(format(row['mAP'], '.3f') for row in callback.history)}; "
          f"peak RSS {peak_rss_mb():.0f} MB")

    print(f"   per check: {', '.join(format(row['seconds'], '.1f') + 's' for row in callback.history)} "
          "(the first one loads / renders the set; later ones read the cache)")

    module.train()
    callback._cached = {}  # a cold cache: the callback loads the images, like the plain loop
    started = time.perf_counter()
    cold, _ = callback.evaluate(trainer, module)
    cold_time = time.perf_counter() - started
    started = time.perf_counter()
    warm, _ = callback.evaluate(trainer, module)
    warm_time = time.perf_counter() - started
    started = time.perf_counter()
    reference = plain_check(module, retrieval.retrieval_set, args.batch_size)
    plain_time = time.perf_counter() - started
    print("2. one check                  time      mAP        recall@1   MRR")
    for label, seconds, values in (("callback, cold cache", cold_time, cold), ("callback, warm cache", warm_time, warm),
                                   ("plain loop (loads)", plain_time, reference)):
        print(f"   {label:<22} {seconds:8.2f}s  {values['mAP']:.6f}  {values['recall@1']:.6f}  {values['MRR']:.6f}")
    diff = max(abs(cold[k] - reference[k]) for k in reference)
    print(f"   cold / plain {cold_time / plain_time:.2f}x, warm / plain {warm_time / plain_time:.2f}x, "
          f"max |diff| {diff:.2e}; peak RSS {peak_rss_mb():.0f} MB")

if __name__ == "__main__":
    main()
