"""Diffusion outpainting sets (IN-Dif-Patch / IN-Dif-Diagonal) with a tiny random-init UNet."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import RePaintPipeline, RePaintScheduler, UNet2DModel
from PIL import Image

from datamodules.synthetic.build import build_synthetic
from datamodules.synthetic.builder import StageTimer
from datamodules.synthetic.outpainting import (
    OutpaintBuilder,
    OutpaintingDataModule,
    diagonal_mask,
    kept_mask,
    load_outpainting_model,
    model_fingerprint,
    patch_side,
    repaint,
    sample_mask,
)
from datamodules.synthetic.sampling import random_square_resized
from datamodules.synthetic.sources import folder_refs

RES = 16
FAST = {"resolution": RES, "num_inference_steps": 4, "jump_length": 2, "jump_n_sample": 2}


def _tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=RES, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "unet"
    _tiny_unet().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five small photos-to-be of different shapes (smooth gradients plus noise)."""
    folder = tmp_path_factory.mktemp("sources")
    for i, (h, w) in enumerate([(20, 24), (24, 20), (16, 16), (30, 22), (18, 26)]):
        rng = np.random.default_rng(i)
        ramp = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 50, h)[:, None, None]
        pixels = np.clip(ramp + rng.integers(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i}.png")
    return folder


def _builder(sources: Path, model: Path, **overrides: Any) -> OutpaintBuilder:
    args: dict[str, Any] = {**FAST, "batch_size": 2, "device": "cpu", **overrides}
    return OutpaintBuilder(folder_refs(sources), model, **args)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "images").glob("*.png"))}


# ----------------------------------------------------------------------------- masks
@pytest.mark.parametrize("resolution", [16, 64, 256])
def test_patch_mask_is_a_square_of_the_right_area(resolution: int) -> None:
    side = patch_side(resolution, 0.2)
    assert side == round(math.sqrt(0.2) * resolution)
    assert abs(side * side / resolution**2 - 0.2) < 2.0 / resolution  # rounding of the side only
    for seed in range(10):
        mask, kept = sample_mask("patch", resolution, 0.2, torch.Generator().manual_seed(seed))
        rows, cols = torch.nonzero(mask, as_tuple=True)
        assert int(mask.sum()) == side * side
        assert rows.max() - rows.min() + 1 == side and cols.max() - cols.min() + 1 == side
        left, top, right, bottom = kept["box"]
        assert (left, top, right, bottom) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        assert kept["kept_fraction"] == pytest.approx(side * side / resolution**2)


@pytest.mark.parametrize("resolution", [7, 16])
def test_diagonal_masks_match_brute_force(resolution: int) -> None:
    n = resolution
    expected = {
        ("main", "upper"): lambda r, c: c >= r, ("main", "lower"): lambda r, c: c <= r,
        ("anti", "upper"): lambda r, c: r + c <= n - 1, ("anti", "lower"): lambda r, c: r + c >= n - 1,
    }
    for (diagonal, half), rule in expected.items():
        mask = diagonal_mask(n, diagonal, half)  # type: ignore[arg-type]
        brute = torch.tensor([[float(rule(r, c)) for c in range(n)] for r in range(n)])
        assert torch.equal(mask, brute), (diagonal, half)
        assert int(mask.sum()) == n * (n + 1) // 2  # half the image plus the diagonal
    for diagonal in ("main", "anti"):
        upper, lower = diagonal_mask(n, diagonal, "upper"), diagonal_mask(n, diagonal, "lower")  # type: ignore[arg-type]
        assert torch.all(upper + lower >= 1) and int((upper * lower).sum()) == n  # overlap = the diagonal
    assert diagonal_mask(n, "main", "upper")[0, n - 1] == 1 and diagonal_mask(n, "main", "upper")[n - 1, 0] == 0


def test_diagonal_sampling_is_seeded_and_covers_all_halves() -> None:
    seen = set()
    for seed in range(40):
        mask, kept = sample_mask("diagonal", RES, 0.2, torch.Generator().manual_seed(seed))
        again, _ = sample_mask("diagonal", RES, 0.2, torch.Generator().manual_seed(seed))
        assert torch.equal(mask, again)
        assert torch.equal(mask, diagonal_mask(RES, kept["diagonal"], kept["half"]))  # description = mask
        assert kept["kept_fraction"] == (RES * (RES + 1) // 2) / RES**2
        seen.add((kept["diagonal"], kept["half"]))
    assert seen == {("main", "upper"), ("main", "lower"), ("anti", "upper"), ("anti", "lower")}


def test_kept_mask_rebuilds_the_sampled_mask_from_its_description() -> None:
    for mode in ("patch", "diagonal"):
        for seed in range(8):
            mask, kept = sample_mask(mode, 32, 0.2, torch.Generator().manual_seed(seed))
            assert torch.equal(kept_mask(json.loads(json.dumps(kept)), 32), mask)  # as read from a manifest
    with pytest.raises(ValueError, match="mode must be"):
        kept_mask({"mode": "ring"}, 32)


# ----------------------------------------------------------------------------- RePaint
@pytest.mark.filterwarnings("ignore:The preprocess method is deprecated:FutureWarning")
def test_repaint_equals_diffusers_pipeline_for_one_image() -> None:
    unet, image = _tiny_unet(), torch.rand(1, 3, RES, RES, generator=torch.Generator().manual_seed(1))
    mask, _ = sample_mask("patch", RES, 0.2, torch.Generator().manual_seed(2))
    pipeline = RePaintPipeline(unet=unet, scheduler=RePaintScheduler())
    pipeline.set_progress_bar_config(disable=True)
    reference = pipeline(image=image * 2 - 1, mask_image=mask[None, None], num_inference_steps=6, jump_length=2,
                         jump_n_sample=2, eta=0.5, generator=torch.Generator().manual_seed(3), output_type="np").images
    ours = repaint(unet, RePaintScheduler(), image, mask[None], [torch.Generator().manual_seed(3)], 6, 2, 2, eta=0.5)
    np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy(), reference, atol=1e-6)


def test_repaint_keeps_the_known_region_and_is_per_image() -> None:
    unet, scheduler = _tiny_unet(), RePaintScheduler()
    images = torch.rand(3, 3, RES, RES, generator=torch.Generator().manual_seed(4))
    masks = torch.stack([sample_mask(m, RES, 0.2, torch.Generator().manual_seed(i))[0]
                         for i, m in enumerate(["patch", "diagonal", "patch"])])
    seeds = [10, 11, 12]
    batch = repaint(unet, scheduler, images, masks, [torch.Generator().manual_seed(s) for s in seeds], 4, 2, 2)
    keep = masks[:, None].expand_as(images).bool()
    assert (batch - images)[keep].abs().max() < 1e-5  # RePaint's last step blends the source back
    assert (batch - images)[~keep].abs().mean() > 0.05  # the rest is generated
    for i, seed in enumerate(seeds):  # an image does not depend on its batch-mates
        alone = repaint(unet, scheduler, images[i:i + 1], masks[i:i + 1], [torch.Generator().manual_seed(seed)], 4, 2, 2)
        assert (alone[0] - batch[i]).abs().max() < 1e-4
    with pytest.raises(ValueError, match="one generator per image"):
        repaint(unet, scheduler, images, masks, [torch.Generator()], 4, 2, 2)


# ----------------------------------------------------------------------------- building
def test_build_keeps_source_pixels_and_records_masks(tmp_path: Path, sources: Path, unet_dir: Path) -> None:
    builder = _builder(sources, unet_dir, mode="patch")
    report = build_synthetic(builder, tmp_path / "set", progress=False)
    assert report.num_items == 5 and not report.reused and report.stage_seconds["diffusion"] > 0
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert manifest["parameters"]["model"]["sha256"] == model_fingerprint(unet_dir, True)["sha256"]
    for item in manifest["items"]:
        ref = builder.queries()[item["query"]]
        source = torch.from_numpy(_pixels(ref.path).astype(np.float32) / 255).permute(2, 0, 1)
        canvas, box = random_square_resized(source, RES, builder.generator(ref.id, 0))
        assert box == item["placement"]["source_box"]
        left, top, right, bottom = item["placement"]["kept"]["box"]
        assert right - left == bottom - top == patch_side(RES, 0.2)
        expected = np.round(canvas.permute(1, 2, 0).numpy() * 255)
        out = _pixels(tmp_path / "set" / item["file"])
        inside = np.zeros((RES, RES), dtype=bool)
        inside[top:bottom, left:right] = True
        assert np.abs(out[inside] - expected[inside]).max() <= 1  # kept: the source, up to uint8 rounding
        assert np.abs(out[~inside] - expected[~inside]).mean() > 10  # outpainted: something else
        # independently of random_square_resized: the box is the largest square inside the source,
        # and the kept pixels are that crop, antialiased-bilinear resized to RES
        h, w = source.shape[-2:]
        x0, y0, x1, y1 = item["placement"]["source_box"]
        assert x1 - x0 == y1 - y0 == min(h, w) and 0 <= x0 and 0 <= y0 and x1 <= w and y1 <= h
        crop = F.interpolate(source[None, :, y0:y1, x0:x1], size=(RES, RES), mode="bilinear", antialias=True,
                             align_corners=False)[0].clamp(0, 1)
        reference = (crop.permute(1, 2, 0).numpy() * 255).round()
        assert np.abs(out[inside] - reference[inside]).max() <= 1


def test_resume_skips_written_items_and_matches_a_clean_build(
    tmp_path: Path, sources: Path, unet_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean = build_synthetic(_builder(sources, unet_dir, mode="diagonal"), tmp_path / "clean", progress=False)
    assert clean.num_items == 5
    rendered: list[int] = []
    original = OutpaintBuilder.render

    def crash_on_second_batch(self: OutpaintBuilder, rows: list[int], timer: StageTimer) -> Any:
        if rendered:
            raise KeyboardInterrupt("simulated kill")
        rendered.extend(rows)
        return original(self, rows, timer)

    monkeypatch.setattr(OutpaintBuilder, "render", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        build_synthetic(_builder(sources, unet_dir, mode="diagonal"), tmp_path / "resumed", progress=False)
    assert rendered == [0, 1] and not (tmp_path / "resumed" / "manifest.json").exists()
    monkeypatch.setattr(OutpaintBuilder, "render", original)
    again: list[int] = []
    monkeypatch.setattr(OutpaintBuilder, "render",
                        lambda self, rows, timer: again.extend(rows) or original(self, rows, timer))
    resumed = build_synthetic(_builder(sources, unet_dir, mode="diagonal"), tmp_path / "resumed", progress=False)
    assert again == [2, 3, 4] and resumed.rendered_queries == 3 and resumed.num_items == 5
    assert _files(tmp_path / "resumed") == _files(tmp_path / "clean")  # per-item seeds: same bytes
    reused = build_synthetic(_builder(sources, unet_dir, mode="diagonal"), tmp_path / "resumed", progress=False)
    assert reused.reused and again == [2, 3, 4]


def test_seed_determines_bytes_and_settings_trigger_rebuild(tmp_path: Path, sources: Path, unet_dir: Path) -> None:
    build_synthetic(_builder(sources, unet_dir, seed=7, batch_size=3), tmp_path / "a", progress=False)
    build_synthetic(_builder(sources, unet_dir, seed=7, batch_size=3), tmp_path / "b", progress=False)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    changed = build_synthetic(_builder(sources, unet_dir, seed=8, batch_size=3), tmp_path / "a", progress=False)
    assert not changed.reused and _files(tmp_path / "a") != _files(tmp_path / "b")


# ----------------------------------------------------------------------------- models
def test_ddpm_checkpoint_uses_ema_weights(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    from models.ddpm import DDPMModule

    module = DDPMModule(resolution=RES, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                        down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                        beta_schedule="squaredcos_cap_v2")
    for shadow in module.ema.shadow_params:
        shadow.add_(0.5)  # EMA weights differ from the raw ones
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "tiny.ckpt")
    raw = next(module.unet.parameters())
    raw_all = dict(module.unet.named_parameters())
    unet, scheduler = load_outpainting_model(tmp_path / "tiny.ckpt", use_ema=True)
    assert torch.allclose(next(unet.parameters()), raw + 0.5) and scheduler.config.beta_schedule == "squaredcos_cap_v2"
    ema = dict(unet.named_parameters())
    assert ema.keys() == raw_all.keys()
    assert all(torch.allclose(ema[name], raw_all[name] + 0.5) for name in raw_all)  # every EMA weight, not just one
    unet, _ = load_outpainting_model(tmp_path / "tiny.ckpt", use_ema=False)
    assert torch.allclose(next(unet.parameters()), raw)
    plain = dict(unet.named_parameters())
    assert plain.keys() == raw_all.keys() and all(torch.equal(plain[name], raw_all[name]) for name in raw_all)
    assert model_fingerprint(tmp_path / "tiny.ckpt", True)["kind"] == "ddpm_checkpoint"


def test_bad_models_get_one_line_errors(tmp_path: Path, sources: Path, unet_dir: Path) -> None:
    with pytest.raises(ValueError, match="outpainting model not found: .*nowhere"):
        load_outpainting_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="incomplete"):
        load_outpainting_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="incomplete"):
        model_fingerprint(tmp_path / "empty", True)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"cannot load .*junk\.ckpt as a DDPMModule checkpoint") as info:
        load_outpainting_model(tmp_path / "junk.ckpt")
    assert "\n" not in str(info.value)
    pipeline = tmp_path / "pipeline"
    (pipeline / "scheduler").mkdir(parents=True)
    _tiny_unet().save_pretrained(pipeline / "unet")
    RePaintScheduler().save_config(pipeline / "scheduler")
    config = json.loads((pipeline / "scheduler" / "scheduler_config.json").read_text())
    (pipeline / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    with pytest.raises(ValueError, match="epsilon-prediction"):
        load_outpainting_model(pipeline)
    with pytest.raises(ValueError, match="divisible by 2"):
        _builder(sources, unet_dir, resolution=17).model()


# ----------------------------------------------------------------------------- datamodule
def test_datamodule_reads_the_set_back(tmp_path: Path, sources: Path, unet_dir: Path) -> None:
    with pytest.raises(ValueError, match="needs unet"):
        OutpaintingDataModule(str(sources), output_dir=str(tmp_path / "x")).setup("test")
    with pytest.raises(ValueError, match="use device: cpu"):
        OutpaintingDataModule(str(sources), str(unet_dir), build_workers=2)
    module = OutpaintingDataModule(str(sources), str(unet_dir), mode="diagonal", num_queries=3,
                                   output_dir=str(tmp_path / "set"), progress=False, device="cpu", **FAST)
    module.prepare_data()
    module.setup("test")
    rs = module.retrieval_set
    assert len(rs.queries) == 3 and len(rs.gallery) == 3 and rs.positives == [[0], [1], [2]]
    item = rs.gallery[0]
    assert item["image"].shape == (3, RES, RES)
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert {i["placement"]["kept"]["mode"] for i in manifest["items"]} == {"diagonal"}
    assert len(manifest["items"]) == 3
    for row, entry in enumerate(manifest["items"]):  # gallery row i is the PNG of manifest item i
        png = torch.from_numpy(_pixels(tmp_path / "set" / entry["file"]).astype(np.float32) / 255).permute(2, 0, 1)
        assert torch.allclose(rs.gallery[row]["image"], png, rtol=0, atol=1e-6)
