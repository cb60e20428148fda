"""What ``lit`` prints: help without loading torch, no library noise the user cannot act on,
the suite's own warnings always, and everything with ``--debug`` / ``LIT_DEBUG=1``."""

from __future__ import annotations

import ast
import dataclasses
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lit.commands import cli
from lit.commands.scan.options import build_parser
from lit.files import StaleLockWarning
from lit.io import ImageSkipWarning
from models.descriptor_config import DescriptorConfig
from models.registry import available_descriptors

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "pytorch_lightning", "lightning_fabric", "timm")
#: Lines that Lightning and third-party libraries print and that say nothing a user can act on.
NOISE = ("💡 Tip", "litlogger", "litmodels", "GPU available:", "TPU available:", "LeafSpec",
         "does not have many workers", "DeprecationWarning")


def _env(**extra: str) -> dict[str, str]:
    """This environment without ``LIT_DEBUG``, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if key != cli.DEBUG_ENV}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _lit(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lit.commands.cli", *args], check=False, cwd=REPO, env=_env(**env),
                          capture_output=True, text=True, timeout=600)


def _help_without(args: list[str]) -> str:
    """``lit ARGS`` run in a fresh interpreter that then asserts no module of :data:`HEAVY` was imported."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['lit', *{args!r}]\n"
            "try:\n    runpy.run_module('lit.commands.cli', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
            "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_top_level_help_lists_every_command_without_torch() -> None:
    text = _help_without(["--help"])
    assert text.startswith("usage: lit") and "{fit,test,predict}" in text and "validate" not in text
    listed = {line.split()[0] for line in text.splitlines() if line.startswith("  ") and line.split()}
    assert {"fit", "test", "predict", "report", "export", "scan", "generate"} <= listed
    assert _help_without(["-h"]) == text


@pytest.mark.parametrize(("command", "option"), [("report", "--metrics"), ("export", "--ckpt_path"),
                                                   ("scan", "--descriptor.name"), ("generate", "--score_only")])
def test_command_help_without_torch(command: str, option: str) -> None:
    text = _help_without([command, "--help"])
    assert text.startswith(f"usage: lit {command}") and option in text and "--out" in text


#: Every option of ``lit scan`` before its parser moved to :mod:`lit.commands.scan.options` (the
#: ``--descriptor.*`` group aside: it is checked against DescriptorConfig's fields below).
SCAN_OPTIONS = (
    "--config", "--print_config", "--generations", "--training", "--out", "--descriptor", "--background", "--norm_k",
    "--norm_beta", "--k", "--thresholds", "--baseline_sample", "--match_mirrors", "--random_sample", "--class_sample",
    "--duplicate_threshold", "--seed", "--block_rows", "--index", "--nprobe", "--rerank_factor", "--index_train_size",
    "--report_rows", "--thumb", "--device", "--batch_size", "--num_workers", "--store_dir", "--dtype", "--progress",
)


def _help_options(text: str) -> set[str]:
    """The options that ``--help`` lists at the start of its lines."""
    return {word.rstrip(",") for line in text.splitlines() for word in line.split()[:1] if word.startswith("--")}


def test_scan_help_lists_every_option_and_every_descriptor_field_and_name() -> None:
    text = _help_without(["scan", "--help"])
    descriptor = {f"--descriptor.{field.name}" for field in dataclasses.fields(DescriptorConfig)}
    assert _help_options(text) == {*SCAN_OPTIONS, *descriptor}
    assert f"(type: str, default: {DescriptorConfig().name})" in " ".join(text.split())
    assert "{token,global,none}" in text and "(type: float, default: 0.95)" in " ".join(text.split())
    names = " ".join(text.split()).split("descriptors (--descriptor.name): ")[1].split(", ")
    assert names == available_descriptors()


def test_the_scan_reads_only_options_its_light_parser_defines() -> None:
    """Every ``args.NAME`` the scan reads is a parsed option (a dropped option fails here, not in a user's scan)."""
    tree = ast.parse((REPO / "lit/commands/scan/command.py").read_text())
    read = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args"}
    dests = {action.dest for action in build_parser()._actions}
    assert read and read <= dests, read - dests


def test_scan_arguments_are_parsed_and_checked_without_torch() -> None:
    """A whole command line, descriptor included, is parsed and checked before torch loads; a mistake
    found there is the one line of before, without torch either."""
    code = ("import sys\n"
            "from lit.commands.scan.options import parse_args\n"
            "from lit.errors import UserError\n"
            "args = parse_args(['--generations', 'g', '--training', 't', '--out', 'o', '--descriptor.name',\n"
            "                   'vit_s16_in1k', '--descriptor.random_init', 'true', '--thresholds', '[0.5]'])\n"
            "print(type(args.descriptor).__name__, args.descriptor.name, args.thresholds)\n"
            "try:\n    parse_args(['--generations', 'g', '--training', 't', '--out', 'o', '--descriptor.name', 'x'])\n"
            "except UserError as error:\n    print(error)\n"
            f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
            "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, env=_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    parsed, refused = result.stdout.splitlines()
    assert parsed == "DescriptorOptions vit_s16_in1k [0.5]"
    assert refused.startswith("--descriptor.name: unknown descriptor 'x'; available: sscd_resnet50, ")


def test_lightning_help_still_lists_the_trainer_options() -> None:
    result = _lit(["test", "--help"])
    assert result.returncode == 0, result.stderr
    assert "--trainer.max_steps" in result.stdout and "--model" in result.stdout


def test_known_warnings_are_silenced_and_the_suite_warnings_stay() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.quiet_known_warnings()
        for module in ("torch.utils._pytree", "timm.models", "jsonargparse._core", "diffusers.schedulers.x",
                       "transformers.models.clip"):
            warnings.warn_explicit("old API", DeprecationWarning, "x.py", 1, module=module)
        warnings.warn_explicit("old API", FutureWarning, "x.py", 1, module="pytorch_lightning.trainer")
        warnings.warn_explicit("The 'test_dataloader' does not have many workers which may be a bottleneck.",
                               UserWarning, "x.py", 1, module="pytorch_lightning.trainer.connectors")
        warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated", UserWarning, "x.py", 1,
                               module="pytorch_lightning.utilities._pytree")
        warnings.warn_explicit("Starting from v1.9.0, `tensorboardX` has been removed as a dependency of the "
                               "`pytorch_lightning` package", UserWarning, "x.py", 1, module="pytorch_lightning.x")
        warnings.warn("skipping image a.png: truncated", ImageSkipWarning)
        warnings.warn("removed a stale lock", StaleLockWarning)
        warnings.warn_explicit("a deprecation in the suite itself", DeprecationWarning, "x.py", 1, module="models.x")
    assert [str(w.message) for w in caught] == ["skipping image a.png: truncated", "removed a stale lock",
                                                "a deprecation in the suite itself"]


def test_lightning_log_lines_are_dropped() -> None:
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    parent = logging.getLogger("pytorch_lightning")
    handler = Keep()
    parent.addHandler(handler)
    try:
        cli.quiet_known_logs()
        for message in ("GPU available: False, used: False", "TPU available: False, using: 0 TPU cores",
                        "💡 Tip: For seamless cloud logging ... litlogger", "Seed set to 0",
                        "`Trainer(limit_test_batches=1)` was configured so 1 batch will be used.",
                        "Restoring states from the checkpoint path at x.ckpt"):
            logger.warning(message)
    finally:
        parent.removeHandler(handler)
    assert records == ["Seed set to 0", "Restoring states from the checkpoint path at x.ckpt"]


def _scan_folders(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    generations, training = root / "gen", root / "train"
    for folder, count in ((generations, 3), (training, 4)):
        folder.mkdir(parents=True)
        for index in range(count):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    (training / "broken.png").write_bytes(b"not a png")
    return generations, training


def test_a_scan_prints_the_skip_warning_but_no_library_noise(tmp_path: Path) -> None:
    generations, training = _scan_folders(tmp_path)
    args = ["scan", "--generations", str(generations), "--training", str(training), "--descriptor.name", "pixel"]
    quiet = _lit([*args, "--out", str(tmp_path / "quiet")])
    assert quiet.returncode == 0, quiet.stderr
    printed = quiet.stdout + quiet.stderr
    assert "ImageSkipWarning: skipping image" in printed and "broken.png" in printed
    assert "lit scan: 3 generations vs 4 training images" in printed
    assert [noise for noise in NOISE if noise in printed] == []
    loud = _lit([*args, "--out", str(tmp_path / "loud")], **{cli.DEBUG_ENV: "1"})
    assert loud.returncode == 0, loud.stderr
    printed = loud.stdout + loud.stderr
    assert "ImageSkipWarning: skipping image" in printed
    assert "GPU available:" in printed and "💡 Tip" in printed  # LIT_DEBUG=1 shows everything


def test_a_lightning_run_prints_its_results_but_no_library_noise(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer: {accelerator: cpu, devices: 1, enable_progress_bar: false, enable_model_summary: false, "
        f"logger: false, default_root_dir: '{tmp_path}'}}\n"
        "model: {class_path: models.retrieval.RetrievalEvaluator, init_args: {descriptor: {name: pixel}}}\n"
        "data: {class_path: datamodules.retrieval.ProceduralRetrievalDataModule, init_args: "
        "{num_queries: 4, copies_per_query: 1, num_distractors: 3, image_size: 16, batch_size: 4}}\n")
    result = _lit(["test", "-c", str(config), "--seed_everything", "0"])
    assert result.returncode == 0, result.stderr
    printed = result.stdout + result.stderr
    assert "Retrieval results (4 queries, 7 gallery images" in printed
    assert [noise for noise in NOISE if noise in printed] == []
