"""``lit export`` and the ``mocov3`` descriptor read from its file: the round trip, ``lit test`` (equal to
the training-time callback), the ReplicationMonitor, DescriptorConfig, overwrite refusal, wrong files,
and a ViT-B/16 export loading as ``mocov3_vit_b16_cutmix``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lit
from callbacks.replication import ReplicationMonitor
from datamodules.images import ProceduralTrainData
from lit.commands.lightning_cli import LitCLI
from lit.commands.cli import main as lit_main
from lit.commands.export import export_descriptor
from lit.errors import UserError
from models.ddpm import DDPMModule
from models.descriptor_config import DescriptorConfig
from models.registry import build_descriptor
from models.weights import EXPORT_FORMAT, ExportMetadata, WeightsError
from tests.descriptor_standin import StandInDescriptorModule

REPO = Path(__file__).resolve().parents[1]
SMALL_SET = dict(num_queries=7, copies_per_query=2, num_distractors=9, image_size=32, batch_size=4)
TINY_DDPM = dict(resolution=16, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                 down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
                 sample_steps=2, warmup_steps=1, learning_rate=1e-3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``lit fit`` of the stand-in (one epoch, the retrieval callback on, a checkpoint at its check), exported."""
    root = tmp_path_factory.mktemp("export")
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False,
            "default_root_dir": str(root),  # where LightningCLI saves config.yaml
            "enable_progress_bar": False, "enable_model_summary": False,
            "callbacks": [
                {"class_path": "callbacks.retrieval.RetrievalMetricsCallback",
                 "init_args": {"datamodule": {"class_path": "datamodules.retrieval.ProceduralRetrievalDataModule",
                                              "init_args": SMALL_SET}, "ks": [1, 5], "verbose": False}},
                {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(root / "ckpt"), "monitor": "retrieval/mAP", "mode": "max"}},
            ],
        },
        "model": {"class_path": "tests.descriptor_standin.StandInDescriptorModule", "init_args": {"lr": 0.05}},
        "data": {"class_path": "datamodules.images.ProceduralTrainData",
                 "init_args": {"num_images": 8, "resolution": 32, "batch_size": 4}},
    }
    (root / "fit.yaml").write_text(yaml.safe_dump(config))
    LitCLI(args=["fit", "-c", str(root / "fit.yaml")])
    (ckpt,) = (root / "ckpt").glob("*.ckpt")
    out = export_descriptor(ckpt, root / "standin.safetensors")  # class path read from the checkpoint
    history = next(v["history"] for k, v in torch.load(ckpt, weights_only=True)["callbacks"].items()
                   if k.startswith("RetrievalMetricsCallback"))
    return {"root": root, "ckpt": ckpt, "file": out, "history": history}


def _images() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.rand(3, 40, 52, generator=generator), torch.rand(3, 32, 32, generator=generator)]


def test_export_round_trip(trained: dict[str, Any]) -> None:
    module = StandInDescriptorModule.load_from_checkpoint(trained["ckpt"], map_location="cpu").eval()
    loaded = build_descriptor("mocov3", weights=trained["file"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(_images()), module.descriptor(_images()), atol=1e-5, rtol=1e-5)
    assert loaded.name == "mocov3" and loaded.preprocessing == module.preprocessing and loaded.output == "global"
    larger = build_descriptor("mocov3", weights=trained["file"], input_size=48)  # pos_embed resampled by timm
    assert larger.input_size == 48 and larger(_images()).shape == (2, 32)
    with pytest.raises(ValueError, match="divisible by 8"):  # the file's patch size
        build_descriptor("mocov3", weights=trained["file"], input_size=36)
    with safe_open(str(trained["file"]), framework="pt") as handle:
        meta = ExportMetadata.from_strings(handle.metadata())
        assert handle.metadata()["format"] == EXPORT_FORMAT
        assert set(handle.keys()) == set(module.backbone.state_dict())
    assert meta.arch == "vit_tiny_patch16_224" and meta.arch_kwargs == module.timm_kwargs()
    assert meta.feature_dim == 32 and meta.input_size == 32
    assert meta.provenance["source_checkpoint_sha256"] == hashlib.sha256(trained["ckpt"].read_bytes()).hexdigest()
    assert meta.provenance["suite_version"] == lit.__version__
    assert meta.provenance["module_class"] == "tests.descriptor_standin.StandInDescriptorModule"
    # DescriptorConfig describes it without building it, from the file's metadata
    config = DescriptorConfig("mocov3", weights=str(trained["file"]))
    assert config.record() == config.record(config.build())
    assert config.record()["preprocessing"] == module.preprocessing.describe()


def test_lit_test_with_the_export_equals_the_callback(trained: dict[str, Any]) -> None:
    """``lit test`` with ``--model.init_args.descriptor.name mocov3`` reproduces the mAP the callback logged
    for the same weights (the checkpoint was saved at that check)."""
    root = trained["root"]
    LitCLI(args=[
        "test", "-c", str(REPO / "configs" / "demo_retrieval.yaml"),
        "--model.init_args.descriptor.name=mocov3", f"--model.init_args.descriptor.weights={trained['file']}",
        *[f"--data.init_args.{k}={v}" for k, v in SMALL_SET.items()], "--data.init_args.num_workers=0",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={root}", "--trainer.logger.init_args.name=test",
    ])
    report = json.loads(next((root / "test").rglob("metrics.json")).read_text())
    assert report["descriptor"] == "mocov3" and report["num_queries"] == 7
    logged = trained["history"][-1]
    for name in ("mAP", "MRR", "recall@1", "hit_rate@5"):
        assert report["metrics"][name] == pytest.approx(logged[name], abs=1e-6), name


def test_replication_monitor_uses_the_export(trained: dict[str, Any], tmp_path: Path) -> None:
    pl.seed_everything(0)
    watch = ReplicationMonitor(descriptor=DescriptorConfig(name="mocov3", weights=str(trained["file"])), num_samples=3,
                               top_k=2, num_copies_shown=2, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, enable_progress_bar=False, logger=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[watch],
                         default_root_dir=tmp_path)
    datamodule = ProceduralTrainData(num_images=5, resolution=16, batch_size=4)
    trainer.fit(DDPMModule(**TINY_DDPM), datamodule=datamodule)
    assert watch.descriptor is not None and watch.descriptor.name == "mocov3" and watch.descriptor.input_size == 32
    assert watch.checked_steps() == [0, 1]
    reference = build_descriptor("mocov3", weights=trained["file"])
    images = torch.stack([datamodule.reference_dataset()[i]["image"] for i in range(5)])
    with torch.no_grad():
        torch.testing.assert_close(watch.train_features, reference(images), atol=1e-5, rtol=1e-5)


def test_overwrite_only_an_earlier_export(trained: dict[str, Any], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = str(trained["ckpt"])
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"not ours")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not written by lit export; refusing to overwrite"):
            export_descriptor(ckpt, foreign, overwrite=overwrite)
    assert foreign.read_bytes() == b"not ours"
    out = tmp_path / "mine.safetensors"
    lit_main(["export", "--ckpt_path", ckpt, "--out", str(out)])  # through the lit command table
    assert "--model.init_args.descriptor.name mocov3 --model.init_args.descriptor.weights" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:  # the lit command ends a user error in one line, status 2
        lit_main(["export", "--ckpt_path", ckpt, "--out", str(out)])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("pass --overwrite to replace it")
    out.write_bytes(b"")  # a truncated export is no longer recognised as ours
    with pytest.raises(UserError, match="not written by lit export"):
        export_descriptor(ckpt, out, overwrite=True)
    out.unlink()
    export_descriptor(ckpt, out)
    before = out.stat().st_mtime_ns
    export_descriptor(ckpt, out, overwrite=True)
    assert out.stat().st_mtime_ns >= before and build_descriptor("mocov3", weights=out).input_size == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.safetensors", "mine.safetensors"]  # no temp left
    with pytest.raises(UserError, match="must end in .safetensors"):
        export_descriptor(ckpt, tmp_path / "model.pt")
    with pytest.raises(UserError, match="no such checkpoint"):
        export_descriptor(tmp_path / "missing.ckpt", tmp_path / "x.safetensors")
    with pytest.raises(SystemExit):  # argparse: no abbreviations
        lit_main(["export", "--ckpt", ckpt, "--out", str(tmp_path / "y.safetensors")])


def test_checkpoint_without_class_path(trained: dict[str, Any], tmp_path: Path) -> None:
    checkpoint = torch.load(trained["ckpt"], weights_only=True)
    checkpoint["hyper_parameters"] = {k: v for k, v in checkpoint["hyper_parameters"].items()
                                      if not k.startswith("_")}
    plain = tmp_path / "plain.ckpt"
    torch.save(checkpoint, plain)
    with pytest.raises(UserError, match="pass --class_path"):
        export_descriptor(plain, tmp_path / "a.safetensors")
    with pytest.raises(UserError, match="is not a LightningModule"):
        export_descriptor(plain, tmp_path / "a.safetensors", class_path="torch.nn.Linear")
    out = export_descriptor(plain, tmp_path / "a.safetensors",
                            class_path="tests.descriptor_standin.StandInDescriptorModule")
    ours, theirs = load_file(str(out)), load_file(str(trained["file"]))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _one_line(error: pytest.ExceptionInfo[WeightsError], path: Path) -> str:
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "lit export" in message
    return message


def test_wrong_files_are_one_line_weights_errors(trained: dict[str, Any], tmp_path: Path) -> None:
    state = tmp_path / "state.pth"
    torch.save({"weight": torch.zeros(2)}, state)
    with pytest.raises(WeightsError) as error:
        build_descriptor("mocov3", weights=state)
    assert "not a file written by lit export" in _one_line(error, state)
    unmarked = tmp_path / "timm.safetensors"
    save_file({"weight": torch.zeros(2)}, str(unmarked))
    with pytest.raises(WeightsError) as error:
        DescriptorConfig("mocov3", weights=str(unmarked)).record()
    assert "not a file written by lit export" in _one_line(error, unmarked)
    broken = tmp_path / "broken.safetensors"
    save_file({"weight": torch.zeros(2)}, str(broken), metadata={"format": EXPORT_FORMAT, "format_version": "1"})
    with pytest.raises(WeightsError) as error:
        build_descriptor("mocov3", weights=broken)
    assert "lacks arch" in _one_line(error, broken)
    with pytest.raises(WeightsError) as error:  # a tiny ViT is not ViT-B/16
        build_descriptor("mocov3_vit_b16_cutmix", weights=trained["file"])
    assert "not a ViT-B/16" in _one_line(error, trained["file"]) and "'mocov3'" in str(error.value)


def test_vit_b16_export_loads_as_mocov3_vit_b16_cutmix(tmp_path: Path) -> None:
    """A ViT-B/16 file in the export format (written here without training) loads under both names,
    with the file's input size and preprocessing, and gives the network's own features."""
    kwargs = {"img_size": 32, "num_classes": 0, "global_pool": "token"}
    network = timm.create_model("vit_base_patch16_224", pretrained=False, weight_init="skip", **kwargs).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    meta = ExportMetadata("vit_base_patch16_224", kwargs, 32, 1.0, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                          "global", 768, {"exported_by": "test"})
    path = tmp_path / "vitb16.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path), metadata=meta.to_strings())
    images = torch.rand(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        expected = F.normalize(network((images - 0.5) / 0.25), dim=-1)
        for name in ("mocov3_vit_b16_cutmix", "mocov3"):
            descriptor = build_descriptor(name, weights=path)
            assert descriptor.name == name and descriptor.input_size == 32
            assert descriptor.preprocessing.mean == (0.5, 0.5, 0.5)
            torch.testing.assert_close(descriptor(images), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:.*(predictor|projector).*random init")
def test_mocov3_module_exports_without_its_initial_weights(tmp_path: Path) -> None:
    """models.mocov3.MoCoV3Module started from an official-layout file, trained a step, exported after
    that file is gone; the export gives the module's descriptor features."""
    from models.mocov3 import MoCoV3Module

    tiny = dict(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=2,
                proj_hidden_dim=32, proj_dim=16, warmup_epochs=0.0)
    torch.manual_seed(0)
    source = MoCoV3Module(**tiny)
    official = tmp_path / "vit-b-300ep.pth.tar"
    torch.save({"state_dict": {f"module.base_encoder.{k}": v for k, v in source.backbone.state_dict().items()}},
               official)
    module = MoCoV3Module(**tiny, weights=str(official))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=ProceduralTrainData(num_images=4, resolution=32, batch_size=4))
    trainer.save_checkpoint(tmp_path / "mocov3.ckpt")
    official.unlink()
    out = export_descriptor(tmp_path / "mocov3.ckpt", tmp_path / "mocov3.safetensors",
                            class_path="models.mocov3.MoCoV3Module")
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(build_descriptor("mocov3", weights=out)(_images()), module.descriptor(_images()),
                                   atol=1e-5, rtol=1e-5)
        assert not torch.allclose(module.backbone.pos_embed, source.backbone.pos_embed)  # it did train
