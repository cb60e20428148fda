"""lit generate across processes: 2-process DDP on CPU writes the bytes of 1 process, and a run killed
with SIGKILL is completed by a rerun to the bytes of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from callbacks.generation_writer import BATCHES, MANIFEST
from lit.commands.generate_options import main as generate
from models.tiny_text2image import write_tiny_sd_pipeline

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square", "a small yellow star", "a purple ring", "a green triangle"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("generate")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return {"root": root, "pipeline": write_tiny_sd_pipeline(root / "sd", image_size=16, seed=5), "prompts": prompts}


def arguments(setup: dict[str, Path], out: Path) -> list[str]:
    return ["--pipeline", str(setup["pipeline"]), "--prompts", str(setup["prompts"]), "--out", str(out),
            "--steps", "3", "--batch_size", "2", "--no_progress", "--accelerator", "cpu"]


def folder_bytes(out: Path) -> dict[str, bytes]:
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "images").glob("*.png"))}
    return {**files, **{name: (out / name).read_bytes() for name in ("generations.csv", "prompts.csv")}}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_two_ddp_processes_write_the_bytes_of_one(setup: dict[str, Path]) -> None:
    single = setup["root"] / "single"
    generate(arguments(setup, single))
    ddp = setup["root"] / "ddp"
    done = subprocess.run([sys.executable, "-m", "lit.commands.cli", "generate", *arguments(setup, ddp), "--devices", "2"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("5 images written") == 1, done.stdout  # the summary once, from rank 0
    assert folder_bytes(ddp) == folder_bytes(single)
    manifest = json.loads((ddp / MANIFEST).read_text())
    assert manifest["complete"] and manifest["run"]["devices"] == 2 and manifest["batches"] == 3
    # one batch left for two processes: the rank without work still reaches the end (no hang)
    (ddp / BATCHES / "b000001.json").unlink()
    (ddp / "generations.csv").unlink()
    again = subprocess.run([sys.executable, "-m", "lit.commands.cli", "generate", *arguments(setup, ddp), "--devices", "2"],
                           cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 images written" in again.stdout and "2 of 3 batches were done already" in again.stdout, again.stdout
    assert folder_bytes(ddp) == folder_bytes(single)


def test_a_killed_run_is_completed_to_the_bytes_of_an_uninterrupted_one(setup: dict[str, Path]) -> None:
    reference = setup["root"] / "reference"
    generate(arguments(setup, reference))
    out = setup["root"] / "killed"
    slow = ("import time, models.generation as g\n_generate = g.TextToImageGenerator.generate\n"
            "def generate(self, *a, **k):\n    time.sleep(1.5)\n    return _generate(self, *a, **k)\n"
            "g.TextToImageGenerator.generate = generate")
    code = f"{slow}\nfrom lit.commands.cli import main\nmain({['generate', *arguments(setup, out)]!r})"
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / BATCHES / "b000000.json").exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert process.poll() is None, "the slowed run ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
    assert not (out / "generations.csv").exists() and not json.loads((out / MANIFEST).read_text())["complete"]
    finished = sorted(p.name for p in (out / BATCHES).iterdir())
    assert finished and len(finished) < 3
    first = (out / "images" / "p000000_i0.png").stat().st_mtime_ns
    with pytest.warns(UserWarning, match="no longer running"):  # the killed run's lock is taken over
        generate(arguments(setup, out))
    assert (out / "images" / "p000000_i0.png").stat().st_mtime_ns == first  # its finished batch was kept
    assert folder_bytes(out) == folder_bytes(reference)
    assert not [p for p in out.rglob("*.tmp")]
