"""models.ddpm.DDPMModule and datamodules.images: shapes, schedules, EMA, sampling, predict, subsets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torchvision.transforms.v2.functional as TF
from diffusers import UNet2DModel
from PIL import Image

from datamodules.images import GenerationSeeds, ImageFolderTrainData, ProceduralTrainData, subset_order
from models.ddpm import DDPMModule
from photo_fixtures import PhotoSet

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
    with torch.no_grad():  # tiny() seeds 0: without this, a fresh UNet would pass the comparison too
        for i, p in enumerate(source.parameters()):
            p.add_(0.1 * (i % 3 + 1))
    source.save_pretrained(tmp_path / "unet_folder")
    model = tiny(pretrained=str(tmp_path / "unet_folder"))
    assert all(torch.equal(a, b) for a, b in zip(source.parameters(), model.unet.parameters()))
    loaded, saved = model.unet.state_dict(), source.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    fresh = tiny().unet.state_dict()
    assert all(not torch.equal(loaded[k], fresh[k]) for k, _ in source.named_parameters())
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


def test_subset_is_seeded_recorded_and_checked(tmp_path: Path, photos: PhotoSet) -> None:
    images = photos.split("train") / "images"
    data = ImageFolderTrainData(root=str(images), subset_size=5, subset_seed=1, resolution=16)
    data.prepare_images()
    again = ImageFolderTrainData(root=str(images), subset_size=5, subset_seed=1, resolution=16)
    other = ImageFolderTrainData(root=str(images), subset_size=5, subset_seed=2, resolution=16)
    again.prepare_images()
    other.prepare_images()
    assert data.names == again.names != other.names and len(data.names) == 5
    files = sorted(images.glob("*.jpg"))
    assert set(data.names) == {str(files[i]) for i in subset_order(len(files), 1)[:5]}
    reference = data.reference_dataset()
    item = reference[2]
    assert item["image"].shape == (3, 16, 16) and item["index"] == 2
    assert torch.equal(reference[2]["image"], item["image"])  # no augmentation
    # the stored images: each chosen file, shorter side resized to 16 (to within one uint8 level)
    assert data.images is not None and len(data.images) == 5
    for name, stored in zip(data.names, data.images):
        pixels = torch.from_numpy(np.asarray(Image.open(name).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
        h, w = pixels.shape[-2:]
        size = (16, int(16 * w / h)) if h <= w else (int(16 * h / w), 16)  # torchvision truncates the long side
        expected = (TF.resize(pixels, list(size), antialias=True).clamp(0, 1) * 255).round()
        assert stored.dtype == torch.uint8 and stored.shape == (3, *size)
        assert (stored.float() - expected).abs().max() <= 1
    # the reference images: the centre 16 x 16 of the stored uint8 images, as float in [0, 1]
    for i in range(5):
        assert torch.equal(reference[i]["image"], TF.center_crop(data.images[i], [16]).float() / 255)
        assert reference[i]["index"] == i
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


def _folder_with_bad_files(root: Path) -> list[str]:
    """5 readable images, 3 unreadable files and a dangling symlink; returns the readable names."""
    root.mkdir()
    for i in range(5):
        Image.fromarray(np.full((20, 24, 3), 40 * i, dtype=np.uint8)).save(root / f"img{i}.png")
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_bytes(b"not an image")
    (root / "truncated.png").write_bytes((root / "img1.png").read_bytes()[:60])
    (root / "gone.png").symlink_to(root / "deleted.png")
    return [str(root / f"img{i}.png") for i in range(5)]


def test_unreadable_files_are_skipped_counted_and_recorded(tmp_path: Path) -> None:
    """subset_size: null trains on every readable file; the skips are named in a warning,
    skipped_images.tsv beside training_subset.tsv, the logged hyper-parameters and the checkpoint."""
    from pytorch_lightning.loggers import TensorBoardLogger

    from datamodules.images import SKIPPED_FILE, SUBSET_FILE

    good = _folder_with_bad_files(tmp_path / "data")
    data = ImageFolderTrainData(root=str(tmp_path / "data"), subset_size=None, resolution=16, batch_size=2)
    run = trainer(tmp_path, max_steps=2, logger=TensorBoardLogger(tmp_path / "logs", name="run"))
    with pytest.warns(UserWarning, match=r"4 unreadable image file\(s\) .* skipped: .*empty.png"):
        run.fit(tiny(), datamodule=data)
    assert sorted(data.names) == good
    log_dir = Path(run.log_dir)
    assert len((log_dir / SUBSET_FILE).read_text().splitlines()) == 2 + 5
    rows = [line.split("\t") for line in (log_dir / SKIPPED_FILE).read_text().splitlines()[2:]]
    reasons = {Path(name).name: reason for name, reason in rows}
    assert set(reasons) == {"empty.png", "text.jpg", "truncated.png", "gone.png"}
    assert reasons["gone.png"] == "dangling symlink" and reasons["empty.png"].startswith("empty file")
    hparams = (log_dir / "hparams.yaml").read_text()
    assert "skipped_images: 4" in hparams and "truncated.png" in hparams
    assert len(data.state_dict()["skipped"]) == 4


def test_strict_and_unmeetable_subset_fail_with_a_clear_message(tmp_path: Path) -> None:
    from lit.commands.lightning_cli import LitCLI
    from lit.errors import UserError
    from lit.io import ImageLoadError

    _folder_with_bad_files(tmp_path / "data")
    with pytest.warns(UserWarning, match="skipped and replaced"), \
            pytest.raises(UserError, match=r"subset_size 6 cannot be met: only 5 of the 8 images .*set it to null"):
        ImageFolderTrainData(root=str(tmp_path / "data"), subset_size=6, resolution=16).prepare_images()
    config = Path(__file__).resolve().parents[1] / "configs" / "ddpm_flowers_all.yaml"
    cli = LitCLI(args=["-c", str(config), f"--data.init_args.root={tmp_path / 'data'}",
                       "--data.init_args.strict=true"], run=False)
    assert cli.datamodule.strict is True
    with pytest.raises(ImageLoadError, match="gone.png: dangling symlink"):
        cli.datamodule.prepare_images()
    (tmp_path / "data" / "gone.png").unlink()
    strict = ImageFolderTrainData(root=str(tmp_path / "data"), resolution=16, strict=True)
    with pytest.raises(ImageLoadError, match="cannot load image .*(empty|text|truncated)"):
        strict.prepare_images()


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
    assert data.images is not None and [im.shape for im in data.images] == [(3, 20, 20)] * 2
    for i in range(2):  # reference: the centre crop of the stored uint8 image, no flip
        assert torch.equal(reference[i]["image"], TF.center_crop(data.images[i], [16]).float() / 255)
        assert torch.equal(reference[i + 2]["image"], reference[i]["image"])  # repeats are not in the reference

    def windows(image: torch.Tensor) -> list[torch.Tensor]:
        return [image[:, y:y + 16, x:x + 16].float() / 255 for y in range(5) for x in range(5)]

    def index_of(draw: torch.Tensor, candidates: list[torch.Tensor]) -> int:
        found = [k for k, c in enumerate(candidates) if torch.equal(draw, c)]
        assert found, "draw is none of the expected crops"
        return found[0]

    plain = windows(data.images[0])
    mirrored = [w.flip(-1) for w in plain]
    assert not any(torch.equal(a, b) for a in plain for b in mirrored)  # the scene is not symmetric
    seen = {index_of(train[0]["image"], plain + mirrored) for _ in range(60)}
    assert len({k % 25 for k in seen}) > 1 and min(seen) < 25 <= max(seen)  # several windows, both orientations
    no_flip = ProceduralTrainData(num_images=2, resolution=16, load_size=20, random_flip=False).train_dataset()
    seen = {index_of(no_flip[0]["image"], plain) for _ in range(30)}  # a window of the stored image, never mirrored
    assert len(seen) > 1
    centre = ProceduralTrainData(num_images=2, resolution=16, load_size=20, random_crop=False).train_dataset()
    expected = TF.center_crop(data.images[0], [16]).float() / 255
    seen = {index_of(centre[0]["image"], [expected, expected.flip(-1)]) for _ in range(30)}
    assert seen == {0, 1}  # exactly the centre crop and its mirror
