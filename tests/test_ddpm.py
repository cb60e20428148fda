"""models.ddpm.DDPMModule and datamodules.images: shapes, schedules, EMA, sampling, predict, subsets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from diffusers import UNet2DModel
from PIL import Image

from datamodules.images import GenerationSeeds, ImageFolderTrainData, ProceduralTrainData, subset_order
from models.ddpm import DDPMModule

BSDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "bsds300" / "train" / "images"
TINY = dict(resolution=16, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
            down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
            sample_steps=4, warmup_steps=2, learning_rate=1e-3)


def tiny(**overrides: object) -> DDPMModule:
    torch.manual_seed(0)
    return DDPMModule(**{**TINY, **overrides})


def trainer(tmp_path: Path, **kwargs: object) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    return pl.Trainer(**{**defaults, **kwargs})


@pytest.mark.filterwarnings("ignore:You are trying to `self.log()`")
def test_training_step_and_scheduler_config() -> None:
    model = tiny()
    loss = model.training_step({"image": torch.rand(3, 3, 16, 16), "index": torch.arange(3)}, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    config = model.noise_scheduler.config
    assert (config.num_train_timesteps, config.beta_schedule, config.prediction_type) == (1000, "linear", "epsilon")
    betas = model.noise_scheduler.betas
    assert torch.allclose(betas, torch.linspace(1e-4, 0.02, 1000))  # Ho et al. linear schedule
    out = model.unet(torch.randn(2, 3, 16, 16), torch.tensor([0, 999])).sample
    assert out.shape == (2, 3, 16, 16)


def test_bad_architecture_is_one_line() -> None:
    with pytest.raises(ValueError, match="one entry per level"):
        tiny(down_block_types=["DownBlock2D"])
    with pytest.raises(ValueError, match="norm_num_groups=3 must divide"):
        tiny(norm_num_groups=3)
    with pytest.raises(ValueError, match="sample_steps"):
        tiny(sample_steps=0)


def test_warmup_then_constant_lr(tmp_path: Path) -> None:
    model = tiny(warmup_steps=4, learning_rate=1e-3)
    run = trainer(tmp_path, max_steps=6)
    data = ProceduralTrainData(num_images=4, resolution=16, batch_size=2)
    lrs: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    run.callbacks.append(Record())
    run.fit(model, datamodule=data)
    assert isinstance(run.optimizers[0], torch.optim.AdamW)
    assert lrs == pytest.approx([1e-3 * (i + 1) / 5 for i in range(4)] + [1e-3, 1e-3])


def test_ema_once_per_optimizer_step_and_in_checkpoint(tmp_path: Path) -> None:
    model = tiny(ema_decay=0.9)
    run = trainer(tmp_path, max_steps=3, accumulate_grad_batches=2)
    run.fit(model, datamodule=ProceduralTrainData(num_images=8, resolution=16, batch_size=2))
    assert model.ema.optimization_step == run.global_step == 3
    shadow = [p.clone() for p in model.ema.shadow_params]
    assert any(not torch.equal(s, p) for s, p in zip(shadow, model.unet.parameters()))  # EMA lags the weights
    path = tmp_path / "model.ckpt"
    run.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["ema"]["optimization_step"] == 3
    restored = DDPMModule.load_from_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(restored.ema.shadow_params, shadow))
    # sampling from EMA weights restores the training weights afterwards
    before = [p.clone() for p in restored.unet.parameters()]
    restored.sample([0], steps=2)
    assert all(torch.equal(a, b) for a, b in zip(before, restored.unet.parameters()))


def test_sample_is_per_seed_deterministic() -> None:
    model = tiny()
    for sampler in ("ddim", "ddpm"):
        together = model.sample([5, 6, 7, 8], sampler=sampler)
        assert together.shape == (4, 3, 16, 16) and 0 <= together.min() and together.max() <= 1
        again = model.sample([5, 6, 7, 8], sampler=sampler)
        assert torch.equal(together, again)
        apart = torch.cat([model.sample([8, 6], sampler=sampler, batch_size=1), model.sample([7, 5], sampler=sampler)])
        # same image whatever the batch; batched convolutions round differently by ~1e-6 per step
        assert torch.allclose(apart, together[[3, 1, 2, 0]], atol=1e-4)
        assert (together[0] - together[1]).abs().max() > 0.05
    with pytest.raises(ValueError, match="seeds"):
        model.sample([-1])


def test_pretrained_folder(tmp_path: Path) -> None:
    source = tiny().unet
    source.save_pretrained(tmp_path / "unet_folder")
    model = tiny(pretrained=str(tmp_path / "unet_folder"))
    assert all(torch.equal(a, b) for a, b in zip(source.parameters(), model.unet.parameters()))
    assert isinstance(model.unet, UNet2DModel)
    assert all(m.training for m in model.unet.modules())  # trains with dropout, like a fresh UNet
    with pytest.raises(ValueError, match=r"not found: .*missing.*config\.json"):
        tiny(pretrained=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="incomplete"):
        tiny(pretrained=str(tmp_path / "empty"))


def test_predict_writes_seeded_pngs(tmp_path: Path) -> None:
    model = tiny(predict_dir=str(tmp_path / "gen"))
    paths = trainer(tmp_path).predict(model, datamodule=GenerationSeeds(num_samples=3, first_seed=10, batch_size=2))
    written = sorted(p.name for p in (tmp_path / "gen").iterdir())
    assert written == ["seed_10.png", "seed_11.png", "seed_12.png"]
    assert sum(len(batch) for batch in paths) == 3
    png = np.asarray(Image.open(tmp_path / "gen" / "seed_11.png"), dtype=np.float32) / 255
    direct = model.sample([11])[0].permute(1, 2, 0).numpy()
    assert np.abs(png - direct).max() <= 0.5 / 255 + 1e-4


def test_subset_is_seeded_recorded_and_checked(tmp_path: Path) -> None:
    data = ImageFolderTrainData(root=str(BSDS), subset_size=5, subset_seed=1, resolution=16)
    data.prepare_images()
    again = ImageFolderTrainData(root=str(BSDS), subset_size=5, subset_seed=1, resolution=16)
    other = ImageFolderTrainData(root=str(BSDS), subset_size=5, subset_seed=2, resolution=16)
    again.prepare_images()
    other.prepare_images()
    assert data.names == again.names != other.names and len(data.names) == 5
    files = sorted(BSDS.glob("*.jpg"))
    assert set(data.names) == {str(files[i]) for i in subset_order(len(files), 1)[:5]}
    reference = data.reference_dataset()
    item = reference[2]
    assert item["image"].shape == (3, 16, 16) and item["index"] == 2
    assert torch.equal(reference[2]["image"], item["image"])  # no augmentation
    with pytest.raises(ValueError, match="different subset"):
        data.load_state_dict(other.state_dict())
    data.load_state_dict(again.state_dict())


def test_unreadable_file_is_replaced(tmp_path: Path) -> None:
    for i in range(4):
        Image.fromarray(np.full((20, 24, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    seed = next(s for s in range(50) if 0 in subset_order(5, s)[:4])  # broken.png sorts first: row 0
    data = ImageFolderTrainData(root=str(tmp_path), subset_size=4, subset_seed=seed, resolution=16)
    with pytest.warns(UserWarning, match="1 unreadable image"):
        data.prepare_images()
    assert len(data.names) == 4 and all("broken" not in n for n in data.names)
    with pytest.raises(ValueError, match="larger than"):
        ImageFolderTrainData(root=str(tmp_path), subset_size=9, resolution=16).prepare_images()


def test_training_augmentation_crops_and_flips() -> None:
    data = ProceduralTrainData(num_images=2, resolution=16, load_size=20, batch_size=2, repeats=3)
    train = data.train_dataset()
    assert len(train) == 6 and train[5]["index"] == 1
    torch.manual_seed(0)
    crops = {tuple(train[0]["image"].flatten()[:8].tolist()) for _ in range(12)}
    assert len(crops) > 1  # random crops / flips differ
    reference = data.reference_dataset()
    assert reference[0]["image"].shape == (3, 16, 16)
    assert torch.equal(reference[0]["image"], reference[0]["image"])
