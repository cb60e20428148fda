"""models.text_pipeline: loading local pipeline folders (one-line errors) and the pixel-space
pipeline against a hand-written sampling loop over the same components."""

from __future__ import annotations

import json
from collections import Counter
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lit.errors import UserError
from models.text_pipeline import PixelTextToImagePipeline, load_text_pipeline
from models.tiny_text2image import bpe_merges, train_clip_tokenizer, write_tiny_pixel_pipeline, write_tiny_sd_pipeline


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {"sd": write_tiny_sd_pipeline(root / "sd", seed=1), "pixel": write_tiny_pixel_pipeline(root / "pixel", seed=1)}


def test_tokenizer_is_built_offline_and_knows_its_words() -> None:
    tokenizer = train_clip_tokenizer(["castle"], max_length=12)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a red castle").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "red</w>", "castle</w>", "<|endoftext|>"]
    assert tokenizer.model_max_length == 12


def test_tokenizer_is_the_same_in_every_call_and_merges_are_bpe() -> None:
    """DDP ranks and resumed runs build it independently: the same words must give the same tokens."""
    first, second = train_clip_tokenizer(["castle", "tower"]), train_clip_tokenizer(["tower", "castle"])
    assert first.get_vocab() == second.get_vocab()
    assert first("a red castle tower").input_ids == second("a red castle tower").input_ids
    # Sennrich et al.'s BPE by hand: (a, b</w>) occurs 3 times, then (a, ab</w>) twice; ties go to the smaller pair
    assert bpe_merges(Counter({"aab": 2, "ab": 1}), 5) == [("a", "b</w>"), ("a", "ab</w>")]
    assert bpe_merges(Counter({"cd": 1, "ab": 1}), 1) == [("a", "b</w>")]


@pytest.mark.parametrize("kind", ["sd", "pixel"])
def test_folders_load_back_with_the_same_weights(folders: dict[str, Path], kind: str) -> None:
    pipeline = load_text_pipeline(folders[kind])
    again = load_text_pipeline(folders[kind])
    for (name, a), (_, b) in zip(pipeline.unet.state_dict().items(), again.unet.state_dict().items()):
        assert torch.equal(a, b), name
    assert (kind == "pixel") == isinstance(pipeline, PixelTextToImagePipeline)


def test_not_a_pipeline_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no model_index.json"):
        load_text_pipeline(tmp_path)
    with pytest.raises(UserError, match="no such pipeline folder"):
        load_text_pipeline(tmp_path / "absent")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    with pytest.raises(UserError, match="a DDPMPipeline folder; lit generates from"):
        load_text_pipeline(tmp_path)


def test_a_missing_component_is_named(folders: dict[str, Path], tmp_path: Path) -> None:
    copy = shutil.copytree(folders["sd"], tmp_path / "sd")
    shutil.rmtree(copy / "tokenizer")
    with pytest.raises(UserError, match=r"lacks tokenizer \(each a sub-folder"):
        load_text_pipeline(copy)


def _manual_pixel_sampling(pipeline: PixelTextToImagePipeline, prompt: str, seed: int, steps: int, guidance: float) -> np.ndarray:
    """DDIM with guidance written out over the pipeline's components (the independent reference)."""
    tok = pipeline.tokenizer
    def embed(text: str) -> torch.Tensor:
        ids = tok([text], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        return pipeline.text_encoder(ids)[0]
    cond, uncond = embed(prompt), embed("")
    size = pipeline.unet.config.sample_size
    x = torch.randn((1, 3, size, size), generator=torch.Generator("cpu").manual_seed(seed))
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        e_u = pipeline.unet(x, t, encoder_hidden_states=uncond).sample
        e_c = pipeline.unet(x, t, encoder_hidden_states=cond).sample
        x = scheduler.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
    return ((x / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def test_pixel_pipeline_equals_a_hand_written_guided_ddim_loop(folders: dict[str, Path]) -> None:
    pipeline = load_text_pipeline(folders["pixel"])
    pipeline.set_progress_bar_config(disable=True)
    out = pipeline("a blue square", generator=torch.Generator("cpu").manual_seed(5), num_inference_steps=4,
                   guidance_scale=3.0, output_type="np").images
    reference = _manual_pixel_sampling(pipeline, "a blue square", seed=5, steps=4, guidance=3.0)
    np.testing.assert_allclose(out, reference, atol=1e-4)


@torch.no_grad()
def test_pixel_pipeline_per_image_generators_and_interrupt(folders: dict[str, Path]) -> None:
    pipeline = load_text_pipeline(folders["pixel"])
    pipeline.set_progress_bar_config(disable=True)
    single = pipeline("a red circle", generator=torch.Generator("cpu").manual_seed(9), num_inference_steps=3, output_type="np").images
    batch = pipeline(["a blue square", "a red circle"], num_inference_steps=3, output_type="np",
                     generator=[torch.Generator("cpu").manual_seed(2), torch.Generator("cpu").manual_seed(9)]).images
    np.testing.assert_allclose(batch[1], single[0], atol=1e-4)
    seen: list[int] = []
    def stop_after_two(pipe: PixelTextToImagePipeline, i: int, t: torch.Tensor, state: dict) -> dict:
        seen.append(i)
        if i == 1:
            pipe._interrupt = True
        return state
    pipeline("a red circle", num_inference_steps=5, output_type="latent", callback_on_step_end=stop_after_two)
    assert seen == [0, 1]
