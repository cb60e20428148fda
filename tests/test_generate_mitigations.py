"""lit generate's inference-time mitigations (--embedding_noise, --random_words) on tiny random pipelines:
images against direct diffusers calls given the noisy embeddings or the changed prompt (built here
independently), the per-image seeding, the memorization score, the records, the refusals, and lit scan."""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from callbacks.generation_writer import PromptTruncationWarning, png_bytes
from lit.commands.generate_options import build_parser
from lit.commands.scan.command import main as scan_main
from lit.errors import UserError
from lit.seeding import derive_seed
from models.generation import EXTRA_PASS, GUIDANCE_BATCH, TextToImageGenerator
from tests.test_generate import (
    PROMPTS,
    direct,
    folder_bytes,
    loaded_pipelines,
    reference_scores,
    run,
    tiny_folders,
    write_prompts,
)

NOISE = 0.5


@dataclass(frozen=True)
class Tiny:
    """The tiny pipelines of tests/test_generate.py: folders, loaded pipelines (for direct calls), a prompt file."""

    folders: dict[str, Path]
    pipelines: dict[str, Any]
    prompt_file: Path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    root = tmp_path_factory.mktemp("tiny")
    folders = tiny_folders(root)
    return Tiny(folders, loaded_pipelines(folders), write_prompts(root))


@torch.no_grad()
def encoded(pipeline: Any, prompt: str) -> torch.Tensor:
    """The prompt's text-encoder states (1, L, D), padded to the tokenizer's length: this test's own encoding."""
    tokenizer = pipeline.tokenizer
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return pipeline.text_encoder(ids)[0]


def seeded_normal(shape: torch.Size, seed: int) -> torch.Tensor:
    """N(0, 1) of ``shape`` from the image's embedding-noise generator, as the manifest's rule states it."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(derive_seed(seed, "embedding_noise")))


def noisy(pipeline: Any, prompt: str, seed: int, scale: float = NOISE) -> torch.Tensor:
    embedding = encoded(pipeline, prompt)
    return embedding + scale * seeded_normal(embedding.shape[1:], seed)[None]


def whole_words(tokenizer: Any) -> set[str]:
    """Tokens ending in </w> whose stem is ASCII letters, without the suffix."""
    return {token[:-4] for token in tokenizer.get_vocab()
            if token.endswith("</w>") and token[:-4].isascii() and token[:-4].isalpha()}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255


# ----------------------------------------------------------------------------- off: nothing changes


def test_zero_mitigations_write_the_bytes_of_a_run_without_them(tiny: Tiny, tmp_path: Path) -> None:
    plain = run(tiny.folders["sd"], tiny.prompt_file, tmp_path / "plain", "--batch_size", "2")
    zero = run(tiny.folders["sd"], tiny.prompt_file, tmp_path / "zero", "--batch_size", "2", "--embedding_noise", "0",
               "--random_words", "0")
    assert folder_bytes(tmp_path / "zero") == folder_bytes(tmp_path / "plain")
    assert all(row["generated_prompt"] == row["prompt"] for row in zero["rows"])
    arguments = zero["manifest"]["arguments"]
    assert (arguments["embedding_noise"], arguments["random_words"]) == (0.0, 0)
    assert plain["manifest"]["mitigations"] == zero["manifest"]["mitigations"]


# ----------------------------------------------------------------------------- embedding noise


@pytest.mark.parametrize("kind", ["sd", "pixel"])
def test_embedding_noise_gives_the_image_of_a_direct_call_with_the_noisy_embeddings(
        tiny: Tiny, tmp_path: Path, kind: str) -> None:
    found = run(tiny.folders[kind], tiny.prompt_file, tmp_path / "out", "--batch_size", "1", "--images_per_prompt", "2",
                "--embedding_noise", str(NOISE))
    pipeline = tiny.pipelines[kind]
    assert found["manifest"]["mitigations"]["embedding_noise"]["std"] == NOISE
    changes = []
    for row in found["rows"]:
        seed = int(row["seed"])
        assert row["generated_prompt"] == row["prompt"]
        image = direct(pipeline, None, seed, prompt_embeds=noisy(pipeline, row["prompt"], seed))[0]
        assert (tmp_path / "out" / row["file"]).read_bytes() == png_bytes(image)
        plain = direct(pipeline, row["prompt"], seed, output_type="np")[0]
        changes.append(np.abs(pixels(tmp_path / "out" / row["file"]) - plain).mean())
    assert min(changes) > 1 / 255  # the noise changes every image (PNG rounding alone: under 0.5 / 255 on average)


def test_embedding_noise_is_drawn_per_image_from_its_seed_and_only_on_the_conditional_side(tiny: Tiny) -> None:
    """The UNet's text input of one call with 3 images of one prompt: the unconditional half is the empty
    prompt's embedding untouched; conditional row i is the prompt's embedding plus the noise of seed i."""
    module = TextToImageGenerator(str(tiny.folders["sd"]), steps=1, embedding_noise=NOISE)
    seen: list[torch.Tensor] = []
    handle = module.pipeline.unet.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    seeds = [11, 12, 13]
    try:
        module.generate(["a red circle"] * 3, seeds)
    finally:
        handle.remove()
    unconditional, conditional = seen[0].chunk(2)
    pipeline = tiny.pipelines["sd"]
    torch.testing.assert_close(unconditional, encoded(pipeline, "").expand(3, -1, -1), rtol=1e-5, atol=1e-6)
    for row, seed in enumerate(seeds):
        expected = noisy(pipeline, "a red circle", seed)
        torch.testing.assert_close(conditional[row:row + 1], expected, rtol=1e-5, atol=1e-6)
    assert (conditional[0] - conditional[1]).abs().max() > NOISE  # every image its own noise


def test_embedding_noise_does_not_depend_on_the_batch(tiny: Tiny, tmp_path: Path) -> None:
    noise = ("--embedding_noise", str(NOISE))
    single = run(tiny.folders["sd"], tiny.prompt_file, tmp_path / "one", "--batch_size", "1", *noise)
    run(tiny.folders["sd"], tiny.prompt_file, tmp_path / "three", "--batch_size", "3", *noise)
    for row in single["rows"]:
        # a batch of 3 images is one computation: equal to single calls up to float summation order
        np.testing.assert_allclose(pixels(tmp_path / "three" / row["file"]), pixels(tmp_path / "one" / row["file"]),
                                   atol=1 / 255 + 1e-4)


# ----------------------------------------------------------------------------- random words


def test_random_words_add_count_vocabulary_words_and_the_image_is_of_the_generated_prompt(
        tiny: Tiny, tmp_path: Path) -> None:
    count = 3
    found = run(tiny.folders["sd"], tiny.prompt_file, tmp_path / "out", "--batch_size", "1", "--images_per_prompt", "2",
                "--random_words", str(count))
    pipeline = tiny.pipelines["sd"]
    vocabulary = whole_words(pipeline.tokenizer)
    assert found["manifest"]["mitigations"]["random_words"]["vocabulary_size"] == len(vocabulary) > 20
    for row in found["rows"]:
        source, generated = row["prompt"].split(), row["generated_prompt"].split()
        assert len(generated) == len(source) + count
        remaining = iter(generated)
        assert all(any(word == other for other in remaining) for word in source)  # the prompt's words, in order
        added = Counter(generated) - Counter(source)
        assert sum(added.values()) == count and set(added) <= vocabulary
        image = direct(pipeline, row["generated_prompt"], int(row["seed"]))[0]
        assert (tmp_path / "out" / row["file"]).read_bytes() == png_bytes(image)
    assert [p["prompt"] for p in found["prompts"]] == PROMPTS[:3]  # prompts.csv keeps the source prompts
    by_prompt = {}
    for row in found["rows"]:
        by_prompt.setdefault(row["prompt"], set()).add(row["generated_prompt"])
    assert all(len(variants) == 2 for variants in by_prompt.values())  # each image its own words
    again = run(tiny.folders["sd"], tiny.prompt_file, tmp_path / "again", "--batch_size", "2",
                "--images_per_prompt", "2", "--random_words", str(count))
    assert [r["generated_prompt"] for r in again["rows"]] == [r["generated_prompt"] for r in found["rows"]]


def test_prompts_that_added_words_make_too_long_are_counted_as_truncated(tiny: Tiny, tmp_path: Path) -> None:
    prompt = "a red circle above a blue square beside a green star"
    tokenizer = tiny.pipelines["sd"].tokenizer
    assert len(tokenizer(prompt).input_ids) + 4 > tokenizer.model_max_length >= len(tokenizer(prompt).input_ids)
    source = tmp_path / "prompts.txt"
    source.write_text(f"a red circle\n{prompt}\n")
    assert run(tiny.folders["sd"], source, tmp_path / "plain")["manifest"]["prompts"]["truncated"] == 0
    with pytest.warns(PromptTruncationWarning, match="1 of 2 prompts are longer"):
        found = run(tiny.folders["sd"], source, tmp_path / "words", "--random_words", "4")
    assert found["manifest"]["prompts"]["truncated_indexes"] == [1]


@pytest.mark.parametrize("negative", [None, "a black background"])
def test_the_score_reads_the_conditioning_actually_used(tiny: Tiny, tmp_path: Path, negative: str | None) -> None:
    """Both mitigations on: the score (from the guidance batch, or with a negative prompt from the added
    empty-prompt pass) equals an independent hook on a direct call given the noisy embedding of the
    generated prompt, and so does the image."""
    extra = ["--negative_prompt", negative] if negative else []
    found = run(tiny.folders["sd"], tiny.prompt_file, tmp_path / "out", "--batch_size", "1", "--guidance", "5",
                "--embedding_noise", str(NOISE), "--random_words", "2", *extra)
    assert found["manifest"]["score"]["mode"] == (EXTRA_PASS if negative else GUIDANCE_BATCH)
    options = {"negative_prompt": negative} if negative else {}
    pipeline = tiny.pipelines["sd"]
    for row in found["rows"]:
        seed = int(row["seed"])
        embeds = noisy(pipeline, row["generated_prompt"], seed)
        d = reference_scores(pipeline, None, seed, 5.0, prompt_embeds=embeds, **options)
        np.testing.assert_allclose(float(row["memorization_score"]), d.mean(), rtol=1e-5)
        np.testing.assert_allclose(float(row["memorization_score_first"]), d[0], rtol=1e-5)
        image = direct(pipeline, None, seed, 5.0, prompt_embeds=embeds, **options)[0]
        assert (tmp_path / "out" / row["file"]).read_bytes() == png_bytes(image)


# ----------------------------------------------------------------------------- options, records, refusals


def test_the_options_are_in_the_help() -> None:
    text = " ".join(build_parser().format_help().split())
    assert "--embedding_noise LAMBDA mitigation: add Gaussian noise" in text
    assert "--random_words COUNT mitigation: insert COUNT random words" in text


@pytest.mark.parametrize(("extra", "message"), [
    (["--embedding_noise", "-0.1"], r"^--embedding_noise must be a finite number >= 0, got -0.1$"),
    (["--embedding_noise", "nan"], r"^--embedding_noise must be a finite number >= 0, got nan$"),
    (["--random_words", "-1"], r"^--random_words must be >= 0, got -1$"),
])
def test_bad_values_are_refused_in_one_line_before_any_folder(
        tiny: Tiny, tmp_path: Path, extra: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        run(tiny.folders["sd"], tiny.prompt_file, tmp_path / "out", *extra)
    assert not (tmp_path / "out").exists()


def test_a_resume_with_other_mitigations_is_refused(tiny: Tiny, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(tiny.folders["sd"], tiny.prompt_file, out, "--random_words", "2", "--embedding_noise", "0.25")
    before = folder_bytes(out)
    with pytest.raises(UserError, match=r"the run there has --random_words 2, this one --random_words 3"):
        run(tiny.folders["sd"], tiny.prompt_file, out, "--random_words", "3", "--embedding_noise", "0.25")
    with pytest.raises(UserError, match=r"the run there has --embedding_noise 0.25, this one --embedding_noise 0.0"):
        run(tiny.folders["sd"], tiny.prompt_file, out, "--random_words", "2")
    assert folder_bytes(out) == before


def test_lit_scan_carries_the_generated_prompt(tiny: Tiny, tmp_path: Path) -> None:
    found = run(tiny.folders["sd"], tiny.prompt_file, tmp_path / "gen", "--random_words", "2")
    train = tmp_path / "train"
    train.mkdir()
    noise = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(noise.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(train / f"t{index}.png")
    out = tmp_path / "scan"
    scan_main(["--generations", str(tmp_path / "gen"), "--training", str(train), "--out", str(out),
               "--descriptor.name", "pixel", "--k", "1", "--device", "cpu", "--progress", "false",
               "--dtype", "float32"])
    with open(out / "matches.csv", newline="") as handle:
        matches = {Path(r["generation"]).name: r for r in csv.DictReader(handle)}
    for row in found["rows"]:
        match = matches[Path(row["file"]).name]
        assert (match["prompt"], match["generated_prompt"]) == (row["prompt"], row["generated_prompt"])
        assert row["generated_prompt"] != row["prompt"]
    report = (out / "report.html").read_text()
    assert "generated from" in report and found["rows"][0]["generated_prompt"] in report
