"""DescriptorConfig: builds what it names, refuses mistakes in one line naming the option, records
what was measured (weights hash, size, the similarity the features imply), compares records."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from lit.commands.scan.sources import store_folder_name
from lit.errors import UserError
from lit.files import file_sha256
from models.descriptor_config import DescriptorConfig
from models.descriptor_options import DEFAULT_DESCRIPTOR, DESCRIPTOR_NAMES, DescriptorOptions
from models.registry import available_descriptors, get_spec, registry_table
from models.weights import WeightsError


def test_record_without_build_equals_record_of_the_built_descriptor() -> None:
    config = DescriptorConfig(name="vit_s16_in1k", random_init=True, input_size=32)
    built = config.build()
    assert config.record() == config.record(built)
    record = config.record(built)
    assert record["input_size"] == 32
    assert record["preprocessing"] == built.preprocessing.describe()
    assert record["display_name"] == "vit_s16_in1k (random init)"
    assert record["similarity"] == "cosine" and record["weights_sha256"] is None


def test_the_features_kind_decides_the_similarity_and_it_is_no_option() -> None:
    """Token features are compared by split-product, global ones by cosine; the record says so, built or not."""
    tokens = DescriptorConfig(name="dino_vit_b16", random_init=True, input_size=32)
    built = tokens.build()
    assert built(torch.rand(1, 3, 32, 32)).ndim == 3 and built.similarity == "split_product"
    assert tokens.resolved_similarity() == tokens.resolved_similarity(built) == "split_product"
    assert tokens.record()["similarity"] == tokens.record(built)["similarity"] == "split_product"
    assert DescriptorConfig().record()["similarity"] == "cosine"
    assert "similarity" not in {field.name for field in dataclasses.fields(DescriptorConfig)}
    with pytest.raises(TypeError):
        DescriptorConfig(name="dino_vit_b16", random_init=True, similarity="cosine")  # type: ignore[call-arg]


def test_weights_hash_is_the_files_sha256_and_follows_changes(tmp_path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"first")
    assert file_sha256(path) == hashlib.sha256(b"first").hexdigest()
    path.write_bytes(b"second version")  # size changes, so the cache key does too
    assert file_sha256(path) == hashlib.sha256(b"second version").hexdigest()


def test_missing_weights_file_is_a_one_line_user_error(tmp_path) -> None:
    with pytest.raises(WeightsError, match="nope.pt") as raised:
        DescriptorConfig(name="sscd_resnet50", weights=str(tmp_path / "nope.pt"))
    message = str(raised.value)
    assert message.startswith("descriptor.weights: weights file not found: ") and "\n" not in message
    assert "published at https://dl.fbaipublicfiles.com/sscd-copy-detection/" in message


@pytest.mark.parametrize(("fields", "message"), [
    ({"name": "nope"}, "descriptor.name: unknown descriptor 'nope'; available: sscd_resnet50, "),
    ({"name": "sscd_resnet50"}, "descriptor.weights: descriptor 'sscd_resnet50' needs a weights file"),
    ({"name": "pixel", "weights": "w.pt"}, "descriptor.weights: descriptor 'pixel' takes no weights, got w.pt"),
    ({"name": "vit_s16_in1k", "weights": "w.pt", "random_init": True},
     "descriptor.weights: give either weights or random_init, not both"),
    ({"name": "vit_s16_in1k", "random_init": True, "input_size": 30},
     "descriptor.input_size: vit_s16_in1k: input_size must be an integer >= 16 divisible by 16, got 30"),
    ({"input_size": 0}, "descriptor.input_size: pixel: input_size must be an integer >= 1"),
    ({"token_normalization": "l2"}, "descriptor.token_normalization: must be one of token, global, none, got 'l2'"),
])
def test_mistakes_are_refused_at_construction_naming_the_option(fields: dict, message: str, tmp_path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pt").write_bytes(b"x")
    with pytest.raises(UserError) as raised:
        DescriptorConfig(**fields)
    assert str(raised.value).startswith(message), str(raised.value)


def test_pixel_features_match_the_descriptor_called_directly() -> None:
    config = DescriptorConfig()
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(config.build()(images), config.build()(images))


# ----------------------------------------------------------------------------- comparing records


def _record(**changes: object) -> dict:
    return {**DescriptorConfig("pixel").record(), **changes}


def test_differences_name_every_field_that_changes_the_features() -> None:
    ours = _record()
    assert DescriptorConfig.differences(ours, dict(ours)) == []
    # the label and the file's location do not change the features: still comparable
    assert DescriptorConfig.differences(ours, _record(display_name="mine", weights="/elsewhere/w.pt")) == []
    theirs = _record(input_size=16, weights_sha256="ab" * 32, similarity="split_product")
    assert DescriptorConfig.differences(ours, theirs) == [
        f"weights_sha256 None vs {'ab' * 32!r}", "input_size 32 vs 16", "similarity 'cosine' vs 'split_product'"]
    for field in ("name", "random_init", "preprocessing", "token_normalization"):
        assert DescriptorConfig.differences(ours, _record(**{field: "other"})) == [
            f"{field} {ours[field]!r} vs 'other'"]
    assert DescriptorConfig.differences(ours, {}) == [  # a record without them (weights_sha256, seed: None in both)
        f"{f} {ours[f]!r} vs None" for f in DescriptorConfig.COMPARED if f not in ("weights_sha256", "seed")]


def test_compared_fields_keep_existing_store_folders() -> None:
    """The fields that decide the features are the ones stores were always compared (and named) by,
    so a scan reuses the stores an earlier version extracted (names computed before this change)."""
    assert DescriptorConfig.COMPARED == ("name", "weights_sha256", "random_init", "seed", "input_size",
                                         "preprocessing", "similarity", "token_normalization")
    assert DescriptorConfig.compared(_record(display_name="x")) == {f: _record()[f] for f in DescriptorConfig.COMPARED}
    pixel = DescriptorConfig("pixel").record()
    assert store_folder_name("training", "abc", pixel, "float16") == "training-08ea9ee5de9c"
    # random-init stores are named by their seed: those of unseeded networks (training-eeb5e96f0b16 before
    # the seed was recorded) are extracted anew, never reused
    tokens = DescriptorConfig("dino_vit_b16", random_init=True, input_size=32).record()
    assert store_folder_name("training", "abc", tokens, "float32") not in ("training-eeb5e96f0b16",
        store_folder_name("training", "abc", {**tokens, "seed": 1}, "float32"))


# ----------------------------------------------------------------------------- random init is seeded


def test_random_init_builds_the_same_network_for_the_same_seed_and_leaves_the_global_rng() -> None:
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = DescriptorConfig("vit_s16_in1k", random_init=True, input_size=32).build()
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was
    torch.manual_seed(456)  # another global state: the same network all the same
    again = DescriptorConfig("vit_s16_in1k", random_init=True, input_size=32, seed=0).build()
    other = DescriptorConfig("vit_s16_in1k", random_init=True, input_size=32, seed=1).build()
    with torch.no_grad():
        out, out_again, out_other = first(images), again(images), other(images)
    assert torch.equal(out, out_again)
    assert not torch.allclose(out, out_other, atol=1e-3)
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_the_seed_is_recorded_and_compared_for_random_init_only() -> None:
    random0 = DescriptorConfig("vit_s16_in1k", random_init=True, input_size=32).record()
    random1 = DescriptorConfig("vit_s16_in1k", random_init=True, input_size=32, seed=1).record()
    assert (random0["seed"], random1["seed"]) == (0, 1)
    assert DescriptorConfig.differences(random0, random1) == ["seed 0 vs 1"]
    assert DescriptorConfig.differences(random0, {**random0, "seed": None}) == ["seed 0 vs None"]  # unseeded
    assert DescriptorConfig("pixel").record()["seed"] is None


@pytest.mark.parametrize(("fields", "message"), [
    ({"name": "vit_s16_in1k", "random_init": True, "seed": -1}, "descriptor.seed: must be an integer >= 0, got -1"),
    ({"name": "vit_s16_in1k", "random_init": True, "seed": True}, "descriptor.seed: must be an integer >= 0"),
    ({"seed": 3}, "descriptor.seed: a seed (3) is only used with random_init true"),
])
def test_seed_mistakes_are_one_line_errors(fields: dict, message: str) -> None:
    with pytest.raises(UserError) as raised:
        DescriptorConfig(**fields)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_the_light_table_names_every_registered_descriptor_and_the_config_takes_exactly_those() -> None:
    """``lit scan --help`` reads names, fields and defaults from models.descriptor_options (no torch): the
    registry, DescriptorConfig and the README table agree with it."""
    assert available_descriptors() == list(DESCRIPTOR_NAMES)
    assert [get_spec(name).name for name in DESCRIPTOR_NAMES] == list(DESCRIPTOR_NAMES)
    assert [row.split("|")[1].strip() for row in registry_table().splitlines()[2:]] == list(DESCRIPTOR_NAMES)
    for name in DESCRIPTOR_NAMES:  # every name of the table is one DescriptorConfig accepts
        DescriptorConfig(name=name, random_init=get_spec(name).weights is not None)
    with pytest.raises(UserError, match=f"available: {', '.join(DESCRIPTOR_NAMES)}$"):
        DescriptorConfig(name="not_in_the_table")
    light = [(f.name, f.type, f.default) for f in dataclasses.fields(DescriptorOptions)]
    assert [(f.name, f.type, f.default) for f in dataclasses.fields(DescriptorConfig)] == light
    assert DescriptorConfig().name == DescriptorOptions().name == DEFAULT_DESCRIPTOR


def test_parsed_options_become_a_config_with_the_registry_checks() -> None:
    options = DescriptorOptions(name="vit_s16_in1k", random_init=True, seed=3, input_size=32)
    config = DescriptorConfig.of(options)
    assert type(config) is DescriptorConfig and dataclasses.asdict(config) == dataclasses.asdict(options)
    assert DescriptorConfig.of(config) is config
    with pytest.raises(UserError, match="^descriptor.input_size: vit_s16_in1k: input_size must be"):
        DescriptorConfig.of(DescriptorOptions(name="vit_s16_in1k", random_init=True, input_size=30))
