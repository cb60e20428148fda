"""The one embedding path (lit/embedding.py): precision, the gather by index, and that ``lit test``'s
evaluator, extraction to a store and the retrieval-metrics callback all embed through it, with
identical features for the same descriptor and images (exactly, on the CPU)."""

from __future__ import annotations

import multiprocessing
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import Tensor

from callbacks.retrieval import RetrievalMetricsCallback
from datamodules.retrieval import FolderRetrievalDataModule
from lit.commands.extract import extract_to_store
from lit.embedding import Embedder, FeatureBuffer, autocast_dtype, embed_dataset, step_precision
from lit.io import load_image
from models.descriptor_config import DescriptorConfig
from models.retrieval import RetrievalEvaluator


# ----------------------------------------------------------------------------- precision


def test_precision_auto_is_float32_on_the_cpu_and_explicit_choices_win() -> None:
    assert autocast_dtype("cpu", "auto") is None and autocast_dtype("cpu", "32") is None
    assert autocast_dtype("cpu", "bf16") is torch.bfloat16
    assert autocast_dtype(torch.device("cpu"), "32") is None
    with pytest.raises(ValueError, match="precision must be auto, 32 or bf16"):
        autocast_dtype("cpu", "16")  # type: ignore[arg-type]
    # inside a Lightning step whose trainer already autocasts (or runs in half), auto adds nothing
    assert step_precision("auto", "32-true") == "auto" and step_precision("auto", "32") == "auto"
    assert step_precision("auto", "bf16-mixed") == "32" and step_precision("auto", "16-mixed") == "32"
    assert step_precision("bf16", "bf16-mixed") == "bf16" and step_precision("32", "32-true") == "32"


def test_embedder_returns_float32_and_autocasts_only_when_asked() -> None:
    seen: list[torch.dtype] = []
    weight = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))

    def model(images: Tensor) -> Tensor:
        out = images.flatten(1) @ weight.T  # a matmul: autocast runs it in bfloat16 when on
        seen.append(out.dtype)
        return out

    images = torch.rand(3, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    plain = Embedder(model, "cpu", "auto")(images)
    half = Embedder(model, "cpu", "bf16")(images)
    assert seen == [torch.float32, torch.bfloat16]
    assert plain.dtype == half.dtype == torch.float32
    assert torch.equal(plain, images.flatten(1) @ weight.T)
    torch.testing.assert_close(half, plain, atol=0.1, rtol=0.05)


def test_embedder_applies_the_transform_to_batches_and_to_lists() -> None:
    flip = lambda x: torch.flip(x, dims=[-1])  # noqa: E731
    images = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(2))
    embed = Embedder(lambda x: torch.stack(list(x)) if isinstance(x, list) else x, transform=flip)
    assert torch.equal(embed(images), flip(images))
    assert torch.equal(embed([images[0], images[1]]), flip(images))
    assert Embedder(lambda x: x.flatten(1)[:, None, :6]).feature_shape(images[0]) == (1, 6)


# ----------------------------------------------------------------------------- the gather


def test_feature_buffer_keeps_one_row_per_index_ordered_by_index() -> None:
    buffer = FeatureBuffer()
    rows = torch.arange(12, dtype=torch.float32).view(6, 2)
    buffer.add(torch.tensor([4, 1, 3]), rows[:3])
    buffer.add(torch.tensor([1, 0, 2]), rows[3:])  # index 1 again: DistributedSampler padding
    assert len(buffer) == 6
    index, features = buffer.local()
    assert index.tolist() == [0, 1, 2, 3, 4]
    assert features is not None and torch.equal(features, rows[[4, 1, 5, 2, 0]])
    gathered_index, gathered = buffer.gather()  # one process: the same rows
    assert torch.equal(gathered_index, index) and torch.equal(gathered, features)
    with pytest.raises(ValueError, match="does not match"):
        buffer.add(torch.tensor([7]), rows[:2])
    with pytest.raises(ValueError, match="nothing here"):
        FeatureBuffer().gather(nothing="nothing here")
    assert FeatureBuffer().local()[1] is None


def test_embed_dataset_skips_unreadable_items_and_orders_by_index() -> None:
    images = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    items = [{"image": None if i == 2 else images[i], "index": 10 + i, "path": f"img{i}"} for i in range(5)]
    embedded = embed_dataset(lambda x: x.flatten(1), items, batch_size=2, precision="32")  # type: ignore[arg-type]
    assert embedded.index.tolist() == [10, 11, 13, 14] and embedded.skipped == ["img2"]
    assert torch.equal(embedded.features, images[[0, 1, 3, 4]].flatten(1))
    with pytest.raises(ValueError, match="no item of the 1 could be loaded"):
        embed_dataset(lambda x: x, [{"image": None, "index": 0}], batch_size=1, desc="train")  # type: ignore[arg-type]


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        rows = torch.arange(30, dtype=torch.float32).view(5, 3, 2)  # token-like rows (5, 3, 2)
        only_rank0 = FeatureBuffer()
        if rank == 0:  # rank 1 embedded nothing: it takes the shape (3, 2) from rank 0, no probe
            only_rank0.add(torch.tensor([3, 0, 4]), rows[[3, 0, 4]])
        padded = FeatureBuffer()  # DistributedSampler-like shards of 5 rows: index 0 repeated as padding
        padded.add(torch.tensor([[0, 2, 4], [1, 3, 0]][rank]), rows[[[0, 2, 4], [1, 3, 0]][rank]])
        items = [{"image": None if i == 3 else rows[i, None].expand(3, 3, 2).clone(), "index": i, "path": f"i{i}"}
                 for i in range(5)]
        embedded = embed_dataset(lambda x: x.flatten(1), items, batch_size=2,  # type: ignore[arg-type]
                                 rank=rank, world_size=2)
        torch.save({"only_rank0": only_rank0.gather(), "padded": padded.gather(),
                    "embedded": (embedded.index, embedded.features, embedded.skipped)},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_gather_the_rows_of_one(tmp_path: Path) -> None:
    """gloo on the CPU: every rank gets every row once, ordered by index, also from a rank with none."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    mp.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method=method)
    rows = torch.arange(30, dtype=torch.float32).view(5, 3, 2)
    images = rows[:, None].expand(5, 3, 3, 2)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        index, features = got["only_rank0"]
        assert index.tolist() == [0, 3, 4] and torch.equal(features, rows[[0, 3, 4]])
        index, features = got["padded"]
        assert index.tolist() == [0, 1, 2, 3, 4] and torch.equal(features, rows)
        index, features, skipped = got["embedded"]
        assert index.tolist() == [0, 1, 2, 4] and skipped == ["i3"]
        assert torch.equal(features, images[[0, 1, 2, 4]].flatten(1))


# ----------------------------------------------------------------------------- every caller, one path


def _class_folders(root: Path, classes: int = 3, per_class: int = 3) -> list[Path]:
    """32 x 32 PNGs (the pixel descriptor's input size: no resampling), ``root/<class>/<image>``."""
    rng = np.random.default_rng(0)
    paths = []
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            path = root / f"c{c}" / f"img{i}.png"
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
            paths.append(path)
    return paths


def test_evaluator_extractor_and_callback_embed_through_the_one_path(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Each caller's features pass through ``Embedder.__call__`` and are, row for row, exactly the
    pixel descriptor's features of the same files; the store holds exactly those rows."""
    paths = _class_folders(tmp_path / "images")
    config = DescriptorConfig("pixel")
    with torch.no_grad():
        reference = config.build()(torch.stack([load_image(p) for p in paths]))  # type: ignore[misc]
    calls: list[Tensor] = []
    original = Embedder.__call__

    def spy(self: Embedder, images: Tensor | list[Tensor]) -> Tensor:
        features = original(self, images)
        blank_probe = isinstance(images, Tensor) and not images.any()  # the extractor's feature-shape probe
        if not blank_probe:
            calls.append(features.detach().cpu().clone())
        return features

    monkeypatch.setattr(Embedder, "__call__", spy)

    def rows_of_this_caller() -> Tensor:
        assert calls, "this caller did not embed through lit.embedding.Embedder"
        rows = torch.cat(calls)
        calls.clear()
        return rows

    def assert_reference_rows(rows: Tensor) -> None:
        matched = [next((i for i in range(len(reference)) if torch.equal(row, reference[i])), None) for row in rows]
        assert None not in matched  # each row is exactly the reference row of its image
        assert set(matched) == set(range(len(reference)))  # and every image was embedded

    trainer_options = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                           enable_model_summary=False, enable_checkpointing=False)
    evaluator = RetrievalEvaluator(descriptor=config, ks=[1], grid_queries=0)
    trainer = pl.Trainer(default_root_dir=tmp_path / "test", **trainer_options)
    trainer.test(evaluator, datamodule=FolderRetrievalDataModule(str(tmp_path / "images"), batch_size=4),
                 verbose=False)
    assert_reference_rows(rows_of_this_caller())

    store = extract_to_store(str(tmp_path / "images"), str(tmp_path / "store"), config, batch_size=4,
                             dtype="float32", trainer_kwargs=trainer_options)
    assert_reference_rows(rows_of_this_caller())
    by_key = {key: i for i, key in enumerate(store.keys)}
    order = [by_key[str(p.relative_to(tmp_path / "images"))] for p in paths]
    assert torch.equal(torch.from_numpy(store.rows(order, np.float32)), reference)

    callback = RetrievalMetricsCallback(FolderRetrievalDataModule(str(tmp_path / "images"), batch_size=4),
                                        ks=[1], batch_size=4, verbose=False)
    trainer = pl.Trainer(default_root_dir=tmp_path / "fit", **trainer_options)
    callback.setup(trainer, evaluator, "fit")  # the evaluator's own descriptor is what is measured
    results, _ = callback.evaluate(trainer, evaluator)
    assert_reference_rows(rows_of_this_caller())
    assert results["mAP"] == pytest.approx(evaluator.results["mAP"], abs=1e-7)  # same features, same scores
