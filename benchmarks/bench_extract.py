"""Extraction speed: ``lit predict`` into a store vs a plain loop, with the decoding rate beside them.

Three rates on the same images, in one run:

- decoding: ``lit.io.load_image`` + resize / centre crop only (the loading bound);
- ours: ``Trainer.predict`` with ``DescriptorExtractor`` + ``ExtractionDataModule`` +
  ``StoreWriterCallback`` (shards, checksums, manifest), ``--workers`` loader processes;
- reference: a plain loop in one process (load, crop, stack, descriptor, ``np.save``).

    .venv/bin/python benchmarks/bench_extract.py --source /path/to/bsds300/train/images
    .venv/bin/python benchmarks/bench_extract.py --source /my/photos --descriptor sscd_resnet50 --random-init --limit 64
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from callbacks.store_writer import StoreWriterCallback
from datamodules.extraction_inputs import ExtractionDataModule, crop_image
from lit.io import list_images, load_image
from lit.store import FeatureStore
from models.descriptor_config import DescriptorConfig
from models.extract import DescriptorExtractor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True,
                        help="a folder of images (benchmarks/README.md: the 200 BSDS300 train JPEGs, 481 x 321)")
    parser.add_argument("--descriptor", default="pixel")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    images = list_images(args.source)[: args.limit]
    listing = work / "images.txt"
    listing.write_text("".join(f"{p}\n" for p in images))
    module = DescriptorExtractor(DescriptorConfig(args.descriptor, random_init=args.random_init))
    pre = module.preprocessing
    print(f"{len(images)} images from {args.source}; descriptor {args.descriptor} "
          f"({pre.describe()}), batch {args.batch_size}, torch threads {torch.get_num_threads()}")

    for path in images:  # warm-up: every phase reads the files from the page cache
        Path(path).read_bytes()
    started = time.perf_counter()
    for path in images:
        crop_image(load_image(path), pre)  # type: ignore[arg-type]
    decode = len(images) / (time.perf_counter() - started)

    started = time.perf_counter()
    features = []
    with torch.inference_mode():
        for begin in range(0, len(images), args.batch_size):
            crops = torch.stack([crop_image(load_image(p), pre) for p in images[begin:begin + args.batch_size]])  # type: ignore[arg-type]
            features.append(module.descriptor.embed_cropped(crops).numpy().astype(np.float16))
    np.save(work / "reference.npy", np.concatenate(features))
    reference = len(images) / (time.perf_counter() - started)

    rows = [("decoding + crop only (1 process)", decode), ("reference: plain loop (1 process)", reference)]
    for workers in args.workers:
        out = work / f"store_{workers}"
        trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
                             enable_checkpointing=False, enable_model_summary=False, precision=args.precision,
                             callbacks=[StoreWriterCallback(str(out), shard_size=max(1, len(images) // 4))])
        started = time.perf_counter()
        trainer.predict(module, datamodule=ExtractionDataModule(str(listing), batch_size=args.batch_size,
                                                                num_workers=workers))
        rows.append((f"ours: lit predict, {workers} loader workers", len(images) / (time.perf_counter() - started)))
        store = FeatureStore.open(out)
        difference = np.abs(store.slice(0, len(store), np.float32) - np.load(work / "reference.npy").astype(np.float32))
        assert len(store) == len(images) and difference.max() < 1e-2, difference.max()
    for name, rate in rows:
        print(f"  {name:44s}{rate:10.1f} img/s")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
