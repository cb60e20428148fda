"""MoCoV3Module: device views (seeded), CutMix forms, momentum rule, frozen patch projection,
lr schedule, official-checkpoint loading and the descriptor contract, on a tiny ViT."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from datamodules.images import ProceduralTrainData
from lit.errors import UserError
from models.augment import TwoViews, cutmix_box, cutmix_views, paste_box
from models.descriptor import Descriptor
from models.mocov3 import MoCoV3Module, mix_labels

TINY = dict(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=2,
            proj_hidden_dim=32, proj_dim=16)


def tiny(**kwargs) -> MoCoV3Module:
    torch.manual_seed(0)
    return MoCoV3Module(**{**TINY, **kwargs})


def batch(n: int = 6, size: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- views


def test_views_repeat_with_the_seed_and_leave_the_global_rng_alone() -> None:
    views = TwoViews(32)
    images = batch()
    state = torch.random.get_rng_state()
    a1, a2 = views(images, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # forked and restored
    b1, b2 = TwoViews(32)(images, seed=7)
    c1, c2 = views(images, seed=8)
    assert a1.shape == a2.shape == (6, 3, 32, 32) and a1.device == images.device
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.allclose(a1, c1) and not torch.allclose(a2, c2)
    assert not torch.allclose(a1, a2)  # two different views
    same = views(images[:1].expand(4, -1, -1, -1), seed=7)[0]
    assert not torch.allclose(same[0], same[1])  # parameters drawn per image, not per batch
    assert float(a1.min()) >= 0.0 and float(a1.max()) <= 1.0


def test_module_views_depend_on_step_and_seed() -> None:
    module, images = tiny(), batch(size=32)
    x1, x2, mixed = module.make_views(images, step=3)
    y1, _, _ = module.make_views(images, step=3)
    z1, _, _ = module.make_views(images, step=4)
    w1, _, _ = tiny(augment_seed=1).make_views(images, step=3)
    assert mixed is None and torch.equal(x1, y1)
    assert not torch.allclose(x1, z1) and not torch.allclose(x1, w1)


# --------------------------------------------------------------------------- CutMix


def test_cutmix_pastes_the_box_of_the_source_into_another_image() -> None:
    images = batch(n=5, size=16)
    mixed = cutmix_views(images, alpha=1.0, seed=3)
    y0, y1, x0, x1 = mixed.box
    assert sorted(mixed.perm.tolist()) == list(range(5))
    assert mixed.area == pytest.approx((y1 - y0) * (x1 - x0) / 256)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    for i in range(5):
        assert torch.equal(mixed.images[i][:, inside], images[i][:, inside])  # the box: image i (the source)
        assert torch.equal(mixed.images[i][:, ~inside], images[mixed.perm[i]][:, ~inside])  # the rest
    assert torch.equal(mixed.perm[mixed.inverse_perm], torch.arange(5))
    again = cutmix_views(images, alpha=1.0, seed=3)
    assert torch.equal(again.images, mixed.images) and again.box == mixed.box
    boxes = {cutmix_views(images, 1.0, seed).box for seed in range(6)}
    assert len(boxes) > 1


def test_cutmix_box_area_follows_lambda() -> None:
    torch.manual_seed(0)
    for lam in (0.0, 0.36, 0.75, 1.0):
        y0, y1, x0, x1 = cutmix_box(100, 100, lam)
        assert 0 <= y0 <= y1 <= 100 and 0 <= x0 <= x1 <= 100
        side = int(100 * math.sqrt(1 - lam))
        assert y1 - y0 <= side and x1 - x0 <= side  # clipped at the border, never larger
    out = paste_box(batch(n=2, size=4), torch.tensor([1, 0]), (0, 4, 0, 4))  # a full box: every image is its own
    assert torch.equal(out, batch(n=2, size=4))


def _share(mixed_images: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """share[j, i]: fraction of mixed image j's pixels that come from (constant-colour) image i."""
    pixels = mixed_images[:, 0].flatten(1)  # (B, P) channel 0 encodes the source
    return (pixels[:, None, :] == colours[None, :, None]).float().mean(-1)


def test_mix_form_targets_are_the_pixel_shares_of_each_source() -> None:
    n = 6
    colours = torch.arange(n, dtype=torch.float32) / 10
    images = colours.view(n, 1, 1, 1).expand(n, 3, 20, 20).contiguous()
    mixed = cutmix_views(images, alpha=1.0, seed=5)
    assert 0 < mixed.area < 1
    share = _share(mixed.images, colours)  # rows: mixed images (view 1 of each batch row), cols: sources
    (a1, b1), (a2, b2) = mix_labels(mixed)

    def dense(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        target = torch.zeros(n, n)
        target[torch.arange(n), a] += mixed.area
        target[torch.arange(n), b] += 1 - mixed.area
        return target

    # q1 row j is mixed image j; its keys k2 are the sources' other views -> weight = share of source in j
    torch.testing.assert_close(dense(a1, b1), share)
    # q2 row i is source i; its keys k1 are mixed images j -> weight = share of source i in mixed image j
    torch.testing.assert_close(dense(a2, b2), share.T)


# --------------------------------------------------------------------------- training


def test_momentum_encoder_follows_the_rule() -> None:
    module = tiny()
    with torch.no_grad():  # make the two encoders differ so the rule is visible
        for p in module.backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))
    old = [p.detach().clone() for p in module._momentum_params()]
    online = [p.detach().clone() for p in module._online_params()]
    x1, x2, _ = module.make_views(batch(size=32), 0)
    loss = module.compute_loss(x1, x2, None, momentum=0.9)
    assert torch.isfinite(loss)
    for new, before, o in zip(module._momentum_params(), old, online):
        torch.testing.assert_close(new.detach(), 0.9 * before + 0.1 * o)
    assert not any(p.requires_grad for p in module._momentum_params())


class _Record(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.momenta: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.momenta.append(module.momentum)
        assert torch.isfinite(outputs["loss"])


def _fit(module: MoCoV3Module, epochs: int = 3) -> _Record:
    data = ProceduralTrainData(num_images=8, resolution=32, random_crop=False, random_flip=False, batch_size=4)
    record = _Record()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[record])
    trainer.fit(module, datamodule=data)
    return record


@pytest.mark.parametrize("cutmix", ["copy", "mix"])
def test_training_steps_schedule_and_frozen_patch_projection(cutmix: str) -> None:
    lr = 1e-3
    module = tiny(lr=lr, warmup_epochs=1.0, cutmix=cutmix, cutmix_prob=1.0)
    patch = [p.detach().clone() for p in module.backbone.patch_embed.proj.parameters()]
    blocks = [p.detach().clone() for p in module.backbone.blocks.parameters()]
    momentum_before = [p.detach().clone() for p in module.momentum_backbone.parameters()]
    record = _fit(module)  # 2 batches per epoch, 3 epochs: 6 steps, 2 of warmup
    assert len(record.lrs) == 6
    # LinearLR from lr / 3 to lr over 2 steps, then cosine over the 4 remaining (lr after each step)
    expected = [lr * 2 / 3, lr] + [lr * (1 + math.cos(math.pi * t / 4)) / 2 for t in (1, 2, 3, 4)]
    assert record.lrs == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert record.momenta == pytest.approx([1 - 0.01 * (math.cos(math.pi * t / 6) + 1) / 2 for t in range(6)])
    for before, after in zip(patch, module.backbone.patch_embed.proj.parameters()):
        assert torch.equal(before, after)  # stop_grad_conv1 (default on)
    assert any(not torch.equal(b, a) for b, a in zip(blocks, module.backbone.blocks.parameters()))
    assert any(not torch.equal(b, a) for b, a in zip(momentum_before, module.momentum_backbone.parameters()))


def test_patch_projection_trains_when_not_frozen() -> None:
    module = tiny(stop_grad_conv1=False, lr=1e-3, warmup_epochs=0.0)
    before = module.backbone.patch_embed.proj.weight.detach().clone()
    _fit(module, epochs=1)
    assert not torch.equal(before, module.backbone.patch_embed.proj.weight)


# --------------------------------------------------------------------------- weights and descriptor


def _official_checkpoint(path: Path, source: MoCoV3Module) -> None:
    """The layout of vit-b-300ep.pth.tar, written from a tiny module."""
    state = {f"module.base_encoder.{k}": v for k, v in source.backbone.state_dict().items()}
    state |= {f"module.base_encoder.head.{k}": v for k, v in source.projector.state_dict().items()}
    state |= {f"module.momentum_encoder.{k}": v for k, v in source.momentum_backbone.state_dict().items()}
    state |= {f"module.predictor.{k}": v for k, v in source.predictor.state_dict().items()}
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": state}, path)


def test_official_checkpoint_loads_into_both_encoders(tmp_path: Path) -> None:
    source = tiny()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    _official_checkpoint(tmp_path / "vit-b-300ep.pth.tar", source)
    module = MoCoV3Module(**TINY, weights=str(tmp_path / "vit-b-300ep.pth.tar"))
    for ours, theirs in ((module.backbone, source.backbone), (module.momentum_backbone, source.backbone),
                         (module.projector, source.projector), (module.momentum_projector, source.projector),
                         (module.predictor, source.predictor)):
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name
    torch.save({"state_dict": {"encoder.x": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="no keys start with 'module.base_encoder.'.*bad.pth"):
        MoCoV3Module(**TINY, weights=str(tmp_path / "bad.pth"))
    with pytest.raises(UserError, match="weights file not found.*missing.pth"):
        MoCoV3Module(**TINY, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="shape mismatches"):
        MoCoV3Module(**{**TINY, "embed_dim": 64}, weights=str(tmp_path / "vit-b-300ep.pth.tar"))


def test_descriptor_contract() -> None:
    module = tiny()
    descriptor = module.descriptor
    assert isinstance(descriptor, Descriptor) and descriptor.backbone is module.backbone
    images = batch(n=3, size=32)
    features = descriptor(images)
    assert features.shape == (3, 48)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(features, module(images))
    assert descriptor(batch(n=2, size=50)).shape == (2, 48)  # any size: resized and cropped to img_size
    arch = module.descriptor_arch
    assert arch["arch"] == "vit_tiny_patch16_224" and arch["patch_size"] == 8 and arch["img_size"] == 32
    assert arch["feature_dim"] == 48 and arch["output"] == "global"
    import timm  # the recorded kwargs rebuild the same backbone
    rebuilt = timm.create_model(arch["arch"], pretrained=False, **arch["timm_kwargs"])
    rebuilt.load_state_dict(module.backbone.state_dict())
    with pytest.raises(UserError, match="cutmix must be"):
        MoCoV3Module(**TINY, cutmix="paste")
