"""Extraction into a feature store from Python: ``lit predict``'s module, datamodule and
prediction writer assembled around one ``pl.Trainer`` (``lit scan`` extracts folders this way)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from callbacks.store_writer import StoreWriterCallback
from datamodules.extraction_inputs import ExtractionDataModule
from lit.embedding import Precision
from lit.store import FeatureStore
from models.descriptor_config import DescriptorConfig
from models.extract import DescriptorExtractor


def extract_to_store(
    source: str,
    output_dir: str,
    config: DescriptorConfig,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    shard_size: int | None = None,
    dtype: str = "float16",
    labels_from_folders: bool = False,
    precision: Precision = "auto",
    trainer_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Embed ``source`` into the store ``output_dir`` (or complete it) with ``lit predict``'s machinery,
    from Python (``lit scan`` extracts folders this way); returns the opened ``FeatureStore``.

    ``trainer_kwargs`` go to ``pl.Trainer`` (default: one device of whatever accelerator is
    there, no logger, no checkpoints)."""
    module = DescriptorExtractor(config, precision)
    options: dict[str, Any] = {"accelerator": "auto", "devices": 1, "logger": False, "enable_checkpointing": False,
                               "enable_model_summary": False, **(trainer_kwargs or {})}
    callback = StoreWriterCallback(output_dir, dtype=dtype, shard_size=shard_size)  # type: ignore[arg-type]
    options["callbacks"] = [*options.get("callbacks", []), callback]
    trainer = pl.Trainer(**options)
    datamodule = ExtractionDataModule(source, batch_size=batch_size, num_workers=num_workers,
                                      labels_from_folders=labels_from_folders)
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    return FeatureStore.open(output_dir)
