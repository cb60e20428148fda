"""DescriptorConfig: builds what it names and records it (weights hash, size, similarity)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from lit.files import file_sha256
from models.descriptor_config import DescriptorConfig


def test_record_without_build_equals_record_of_the_built_descriptor() -> None:
    config = DescriptorConfig(name="vit_s16_in1k", random_init=True, input_size=32)
    built = config.build()
    assert config.record() == config.record(built)
    record = config.record(built)
    assert record["input_size"] == 32
    assert record["preprocessing"] == built.preprocessing.describe()
    assert record["display_name"] == "vit_s16_in1k (random init)"
    assert record["similarity"] == "cosine" and record["weights_sha256"] is None


def test_token_descriptor_defaults_to_split_product_unless_told() -> None:
    assert DescriptorConfig(name="dino_vit_b16", random_init=True).resolved_similarity() == "split_product"
    assert DescriptorConfig(name="dino_vit_b16", similarity="cosine").resolved_similarity() == "cosine"


def test_weights_hash_is_the_files_sha256_and_follows_changes(tmp_path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"first")
    assert file_sha256(path) == hashlib.sha256(b"first").hexdigest()
    path.write_bytes(b"second version")  # size changes, so the cache key does too
    assert file_sha256(path) == hashlib.sha256(b"second version").hexdigest()


def test_missing_weights_file_is_a_one_line_user_error(tmp_path) -> None:
    from lit.errors import UserError

    with pytest.raises(UserError, match="nope.pt"):
        DescriptorConfig(name="sscd_resnet50", weights=str(tmp_path / "nope.pt")).build()


def test_pixel_features_match_the_descriptor_called_directly() -> None:
    config = DescriptorConfig()
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(config.build()(images), config.build()(images))
