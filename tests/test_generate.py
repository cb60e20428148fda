"""lit generate on tiny random pipelines: images against direct diffusers calls, the memorization score
against an independent computation, score-only screening, resume, ablations, and one-line refusals."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

from callbacks.generation_writer import BATCHES, COLUMNS, MANIFEST, PROMPT_COLUMNS, PromptTruncationWarning, png_bytes
from datamodules.generation import generation_jobs, global_batches
from datamodules.prompts import Prompt
from lit.commands.generate_options import main as generate
from lit.commands.scan.command import main as scan_main
from lit.errors import UserError
from lit.seeding import derive_seed
from models.generation import EXTRA_PASS, GUIDANCE_BATCH
from models.text_pipeline import load_text_pipeline
from models.tiny_text2image import write_tiny_pixel_pipeline, write_tiny_sd_pipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
STEPS = 3
PROMPTS = ["a red circle", "a blue square on a green background", "a small yellow star", "a purple ring"]


def tiny_folders(root: Path) -> dict[str, Path]:
    """A tiny Stable Diffusion-layout folder (32 px) and a pixel-space one (16 px) under ``root``."""
    return {"sd": write_tiny_sd_pipeline(root / "sd", image_size=32, seed=3),
            "pixel": write_tiny_pixel_pipeline(root / "pixel", image_size=16, seed=3)}


def loaded_pipelines(folders: dict[str, Path]) -> dict[str, Any]:
    """The folders' pipelines, loaded (for direct calls), without progress bars."""
    loaded = {}
    for kind, folder in folders.items():
        pipeline = load_text_pipeline(folder)
        pipeline.set_progress_bar_config(disable=True)
        loaded[kind] = pipeline
    return loaded


def write_prompts(folder: Path) -> Path:
    """``prompts.txt`` with the first three of :data:`PROMPTS`."""
    path = folder / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:3]) + "\n")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_folders(tmp_path_factory.mktemp("pipelines"))


@pytest.fixture(scope="module")
def pipelines(folders: dict[str, Path]) -> dict[str, Any]:
    return loaded_pipelines(folders)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_prompts(tmp_path_factory.mktemp("prompts"))


def run(pipeline: Path, prompts: Path | None, out: Path, *extra: str, ablate: str | None = None) -> dict[str, Any]:
    """lit generate in this process (3 steps, no progress bar); returns the parsed outputs."""
    source = ["--prompts", str(prompts)] if prompts is not None else ["--ablate", str(ablate)]
    generate(["--pipeline", str(pipeline), *source, "--out", str(out), "--steps", str(STEPS), "--no_progress",
              "--accelerator", "cpu", *extra])
    return outputs(out)


def outputs(out: Path) -> dict[str, Any]:
    with open(out / "generations.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(out / "prompts.csv", newline="") as handle:
        prompts = list(csv.DictReader(handle))
    return {"rows": rows, "prompts": prompts, "manifest": json.loads((out / MANIFEST).read_text())}


def folder_bytes(out: Path) -> dict[str, bytes]:
    """The images and CSVs of a run (the manifest records the machine and is left out)."""
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "images").glob("*.png"))}
    for name in ("generations.csv", "prompts.csv"):
        files[name] = (out / name).read_bytes()
    return files


def direct(pipeline: Any, prompt: str, seed: int, guidance: float = 7.5, **options: Any) -> Any:
    return pipeline(prompt, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=STEPS,
                    guidance_scale=guidance, **options).images


def empty_embedding(pipeline: Any) -> torch.Tensor:
    tokenizer = pipeline.tokenizer
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return pipeline.text_encoder(ids)[0]


@torch.no_grad()
def reference_scores(pipeline: Any, prompt: str, seed: int, guidance: float, **options: Any) -> np.ndarray:
    """d_t of every UNet call of a direct pipeline call, in float64, from this test's own forward hook:
    the guidance batch's halves, or (no guidance batch / a negative prompt) the conditional prediction
    against a separate UNet call with the empty prompt's embedding."""
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        calls.append((args[0].clone(), args[1], output[0].clone()))

    handle = pipeline.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        direct(pipeline, prompt, seed, guidance, output_type="latent", **options)
    finally:
        handle.remove()
    empty = empty_embedding(pipeline)
    scores = []
    for sample, timestep, prediction in calls:
        if guidance > 1 and "negative_prompt" not in options:
            unconditional, conditional = prediction.double().chunk(2)
        else:
            conditional = prediction[-1:].double()
            unconditional = pipeline.unet(sample[-1:], timestep, encoder_hidden_states=empty).sample.double()
        scores.append(float(torch.linalg.vector_norm((conditional - unconditional).flatten())))
    return np.array(scores)


# ----------------------------------------------------------------------------- images and seeds


@pytest.mark.parametrize("kind", ["sd", "pixel"])
def test_images_equal_direct_pipeline_calls_with_the_recorded_seeds(
        folders: dict[str, Path], pipelines: dict[str, Any], prompt_file: Path, tmp_path: Path, kind: str) -> None:
    found = run(folders[kind], prompt_file, tmp_path / "out", "--images_per_prompt", "2", "--batch_size", "4")
    rows, pipeline = found["rows"], pipelines[kind]
    assert list(rows[0]) == list(COLUMNS)
    assert [(r["prompt"], int(r["prompt_index"]), int(r["image_index"])) for r in rows] == [
        (text, p, i) for p, text in enumerate(PROMPTS[:3]) for i in range(2)]
    assert len({r["seed"] for r in rows}) == 6
    for row in rows:
        assert int(row["seed"]) == derive_seed(0, int(row["prompt_index"]), int(row["image_index"]))
        assert row["file"] == f"images/p{int(row['prompt_index']):06d}_i{row['image_index']}.png"
        assert row["source_key"] == "" and row["variant"] == ""
        saved = np.asarray(Image.open(tmp_path / "out" / row["file"]).convert("RGB"), dtype=np.float64) / 255
        reference = direct(pipeline, row["prompt"], int(row["seed"]), output_type="np")[0]
        # batches of 4 images are one computation: equal to a single call up to float summation order
        np.testing.assert_allclose(saved, reference, atol=1 / 255 + 1e-4)
    assert found["manifest"]["score"]["mode"] == GUIDANCE_BATCH


def test_batch_size_one_writes_the_bytes_of_a_direct_call(folders: dict[str, Path], pipelines: dict[str, Any],
                                                           prompt_file: Path, tmp_path: Path) -> None:
    found = run(folders["sd"], prompt_file, tmp_path / "out", "--batch_size", "1", "--scheduler", "dpm")
    pipeline = pipelines["sd"]
    scheduler = pipeline.scheduler
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config)
    try:
        for row in found["rows"]:
            image = direct(pipeline, row["prompt"], int(row["seed"]))[0]
            assert (tmp_path / "out" / row["file"]).read_bytes() == png_bytes(image)
    finally:
        pipeline.scheduler = scheduler
    assert found["manifest"]["scheduler"]["class"] == "DPMSolverMultistepScheduler"


def test_jobs_and_global_batches_do_not_depend_on_ranks() -> None:
    prompts = [Prompt(i, f"prompt {i}", None) for i in range(5)]
    jobs = generation_jobs(prompts, 2, seed=7)
    batches = global_batches(jobs, 4)
    assert [len(b.jobs) for b in batches] == [4, 4, 2]
    assert [job for b in batches for job in b.jobs] == jobs
    ablation = generation_jobs([Prompt(i, f"v{i}", None, f"variant {i}") for i in range(3)], 2, seed=7, same_seeds=True)
    assert [job.seed for job in ablation] == [derive_seed(7, 0, 0), derive_seed(7, 0, 1)] * 3


# ----------------------------------------------------------------------------- the memorization score


@pytest.mark.parametrize("kind", ["sd", "pixel"])
def test_score_equals_an_independent_hook_on_the_guidance_batch(
        folders: dict[str, Path], pipelines: dict[str, Any], prompt_file: Path, tmp_path: Path, kind: str) -> None:
    found = run(folders[kind], prompt_file, tmp_path / "out", "--batch_size", "1", "--guidance", "5")
    for row in found["rows"]:
        d = reference_scores(pipelines[kind], row["prompt"], int(row["seed"]), 5.0)
        assert len(d) == STEPS and d.min() > 0
        np.testing.assert_allclose(float(row["memorization_score"]), d.mean(), rtol=1e-5)
        np.testing.assert_allclose(float(row["memorization_score_first"]), d[0], rtol=1e-5)
    for prompt in found["prompts"]:
        assert list(prompt) == list(PROMPT_COLUMNS) and prompt["images"] == "1"


@pytest.mark.parametrize(("guidance", "negative"), [(1.0, None), (5.0, "a black background")])
def test_without_a_guidance_batch_the_score_adds_the_empty_prompt_pass(
        folders: dict[str, Path], pipelines: dict[str, Any], prompt_file: Path, tmp_path: Path,
        guidance: float, negative: str | None) -> None:
    extra = ["--negative_prompt", negative] if negative else []
    found = run(folders["sd"], prompt_file, tmp_path / "out", "--batch_size", "1", "--guidance", str(guidance), *extra)
    assert found["manifest"]["score"]["mode"] == EXTRA_PASS
    options = {"negative_prompt": negative} if negative else {}
    for row in found["rows"]:
        d = reference_scores(pipelines["sd"], row["prompt"], int(row["seed"]), guidance, **options)
        np.testing.assert_allclose(float(row["memorization_score"]), d.mean(), rtol=1e-5)
        np.testing.assert_allclose(float(row["memorization_score_first"]), d[0], rtol=1e-5)
        image = direct(pipelines["sd"], row["prompt"], int(row["seed"]), guidance, **options)[0]
        assert (tmp_path / "out" / row["file"]).read_bytes() == png_bytes(image)  # the extra pass changes nothing


def test_score_only_equals_the_first_k_steps_of_a_full_run(folders: dict[str, Path], pipelines: dict[str, Any],
                                                            prompt_file: Path, tmp_path: Path) -> None:
    found = run(folders["sd"], prompt_file, tmp_path / "out", "--score_only", "--score_steps", "2", "--batch_size", "2")
    assert not (tmp_path / "out" / "images").exists()
    manifest = found["manifest"]
    assert manifest["score_only"] is True and manifest["score"]["steps"] == 2 and manifest["images"] == 0
    for row in found["rows"]:
        assert row["file"] == ""
        d = reference_scores(pipelines["sd"], row["prompt"], int(row["seed"]), 7.5)
        np.testing.assert_allclose(float(row["memorization_score"]), d[:2].mean(), rtol=1e-5)
        np.testing.assert_allclose(float(row["memorization_score_first"]), d[0], rtol=1e-5)


# ----------------------------------------------------------------------------- resume


def test_a_rerun_completes_a_damaged_run_to_the_same_bytes(folders: dict[str, Path], prompt_file: Path,
                                                           tmp_path: Path) -> None:
    options = ("--images_per_prompt", "2", "--batch_size", "4")
    run(folders["sd"], prompt_file, tmp_path / "whole", *options)
    out = tmp_path / "damaged"
    run(folders["sd"], prompt_file, out, *options)
    untouched = (out / "images" / "p000000_i0.png").stat().st_mtime_ns
    (out / "images" / "p000002_i1.png").unlink()  # batch 1 (jobs 4, 5): its image is gone
    (out / "generations.csv").unlink()
    run(folders["sd"], prompt_file, out, *options)
    assert folder_bytes(out) == folder_bytes(tmp_path / "whole")
    assert (out / "images" / "p000000_i0.png").stat().st_mtime_ns == untouched  # batch 0 was done: skipped
    (out / BATCHES / "b000000.json").unlink()  # batch 0's rows are gone: the whole batch again
    run(folders["sd"], prompt_file, out, *options)
    assert folder_bytes(out) == folder_bytes(tmp_path / "whole")
    assert (out / "images" / "p000000_i0.png").stat().st_mtime_ns != untouched


def test_a_rerun_with_other_arguments_is_refused_and_changes_nothing(folders: dict[str, Path], prompt_file: Path,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(folders["sd"], prompt_file, out)
    before = folder_bytes(out)
    with pytest.raises(UserError, match=r"holds another run \(the run there has --guidance 7.5, this one --guidance 3.0\)"):
        run(folders["sd"], prompt_file, out, "--guidance", "3")
    with pytest.raises(UserError, match=r"the run there has --batch_size 4, this one --batch_size 2"):
        run(folders["sd"], prompt_file, out, "--batch_size", "2")
    with pytest.raises(UserError, match=r"--pipeline .*pixel: not the pipeline the run there used"):
        run(folders["pixel"], prompt_file, out, "--height", "32", "--width", "32")
    other = tmp_path / "other.txt"
    other.write_text("a green triangle\n")
    with pytest.raises(UserError, match="not the prompts the run there used"):
        run(folders["sd"], other, out)
    assert folder_bytes(out) == before
    (out / "prompts.csv").unlink()
    run(folders["sd"], prompt_file, out)  # the same arguments are welcome (the lock was released each time)
    assert folder_bytes(out) == before  # nothing left to generate: the CSVs are written again all the same


def test_an_out_folder_with_foreign_files_is_refused(folders: dict[str, Path], prompt_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(UserError, match="is not empty and was not made by lit generate"):
        run(folders["sd"], prompt_file, out)
    assert [p.name for p in out.iterdir()] == ["holiday.jpg"]


def test_a_users_files_in_a_generate_folder_survive_reruns(folders: dict[str, Path], prompt_file: Path,
                                                           tmp_path: Path) -> None:
    """A rerun removes only what lit generate wrote: its row files when the manifest is gone, and the
    temporary files of a killed run's atomic writes; a user's files beside them stay."""
    out = tmp_path / "out"
    run(folders["sd"], prompt_file, out)
    before = folder_bytes(out)
    mine = {out / "notes.txt": b"mine", out / "images" / "notes.txt": b"mine too",
            out / BATCHES / "bmine.json": b"{}", out / BATCHES / "b000000.json.bak": b"a copy"}
    for path, data in mine.items():
        path.write_bytes(data)
    killed = out / "images" / ".p000000_i0.png.k1ll3d.tmp"  # what lit.files.atomic_path leaves when killed
    killed.write_bytes(b"half an image")
    (out / MANIFEST).unlink()  # row files without a manifest cannot be checked: they are regenerated
    run(folders["sd"], prompt_file, out)
    assert folder_bytes(out) == before
    assert not killed.exists()
    assert all(path.read_bytes() == data for path, data in mine.items())


# ----------------------------------------------------------------------------- prompts: ablation, truncation


def test_ablation_variants_share_seeds_per_image_index(folders: dict[str, Path], tmp_path: Path) -> None:
    found = run(folders["sd"], None, tmp_path / "out", "--images_per_prompt", "2", ablate="a red castle")
    rows = found["rows"]
    variants = [r["variant"] for r in rows[::2]]
    assert variants == ["full", "drop 1: a", "drop 2: red", "drop 3: castle", "first 2 words", "first 1 words"]
    for image_index in (0, 1):
        assert {int(r["seed"]) for r in rows if r["image_index"] == str(image_index)} == {derive_seed(0, 0, image_index)}
    same = [r for r in rows if r["prompt"] == "a red" and r["image_index"] == "0"]  # "drop 3" == "first 2 words"
    assert len(same) == 2 and (tmp_path / "out" / same[0]["file"]).read_bytes() == \
        (tmp_path / "out" / same[1]["file"]).read_bytes()
    assert [p["variant"] for p in found["prompts"]] == variants


def test_long_prompts_are_truncated_counted_and_recorded(folders: dict[str, Path], pipelines: dict[str, Any],
                                                          tmp_path: Path) -> None:
    long = "a red circle above a blue square beside a green triangle below a yellow star with a purple ring"
    source = tmp_path / "prompts.txt"
    source.write_text(f"a red circle\n\n   \n{long}\n")
    limit = pipelines["sd"].tokenizer.model_max_length
    assert len(pipelines["sd"].tokenizer(long).input_ids) > limit
    with pytest.warns(PromptTruncationWarning, match=rf"1 of 2 prompts are longer than the tokenizer's {limit} tokens"):
        found = run(folders["sd"], source, tmp_path / "out", "--batch_size", "1")
    prompts = found["manifest"]["prompts"]
    assert prompts["truncated"] == 1 and prompts["truncated_indexes"] == [1]
    assert prompts["source"]["skipped"] == {"blank line": 2}
    assert [r["prompt"] for r in found["rows"]] == ["a red circle", long]
    image = direct(pipelines["sd"], long, int(found["rows"][1]["seed"]))[0]  # the pipeline truncates it the same way
    assert (tmp_path / "out" / "images" / "p000001_i0.png").read_bytes() == png_bytes(image)


# ----------------------------------------------------------------------------- bad input: one line each


def test_bad_prompt_sources_are_named(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^--prompts .*absent.txt: prompt source .*absent.txt not found$"):
        run(folders["sd"], tmp_path / "absent.txt", tmp_path / "out")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(UserError, match=r"^--prompts .*blank.txt: .*holds no usable prompt \(3 blank lines skipped\)"):
        run(folders["sd"], blank, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_pipeline_folders_are_named(folders: dict[str, Path], prompt_file: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^--pipeline .*: .* has no model_index.json$"):
        run(tmp_path, prompt_file, tmp_path / "out")
    broken = shutil.copytree(folders["sd"], tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    with pytest.raises(UserError, match=r"lacks vae \(each a sub-folder"):
        run(broken, prompt_file, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--precision", "bf16"], r"--precision bf16 runs on a GPU only"),
    (["--score_steps", "2"], r"--score_steps applies with --score_only"),
    (["--score_only", "--score_steps", "9"], r"--score_steps must lie in \[1, --steps 3\], got 9"),
    (["--height", "20"], r"--height 20: this pipeline generates sides that divide by 8"),
    (["--guidance", "-1"], r"--guidance must be a finite number >= 0, got -1.0"),
    (["--n", "5"], r"--n: cannot draw 5 prompts without replacement from the 3 rows"),
    (["--images_per_prompt", "0"], r"--images_per_prompt must be >= 1, got 0"),
])
def test_bad_options_are_refused_in_one_line_before_any_folder(folders: dict[str, Path], prompt_file: Path,
                                                               tmp_path: Path, extra: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message) as caught:
        run(folders["sd"], prompt_file, tmp_path / "out", *extra)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_a_non_finite_prediction_names_the_prompt_and_seed(folders: dict[str, Path], prompt_file: Path,
                                                           tmp_path: Path) -> None:
    pipeline = load_text_pipeline(folders["sd"])
    with torch.no_grad():
        pipeline.unet.conv_out.bias[0] = float("nan")
    pipeline.save_pretrained(tmp_path / "nan")
    seed = derive_seed(0, 0, 0)
    with pytest.raises(UserError, match=rf"the noise prediction at step 1 is not finite \(NaN or inf\) for prompt "
                                        rf"'a red circle' with seed {seed}"):
        run(tmp_path / "nan", prompt_file, tmp_path / "out")
    run(folders["sd"], prompt_file, tmp_path / "out2")  # the lock of the failed run's folder was released
    with pytest.raises(UserError, match="not the pipeline the run there used"):
        run(folders["sd"], prompt_file, tmp_path / "out")


def test_the_cli_prints_one_error_line(folders: dict[str, Path], tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    failed = subprocess.run([sys.executable, "-m", "lit.commands.cli", "generate", "--pipeline", str(folders["sd"]),
                             "--out", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1] == 'error: give --prompts SOURCE or --ablate "PROMPT" (one of them)'


# ----------------------------------------------------------------------------- what lit scan reads


def test_lit_scan_reads_a_lit_generate_folder(folders: dict[str, Path], tmp_path: Path) -> None:
    """End to end: prompts with source keys -> lit generate -> two generations planted in the training
    set under their source keys -> lit scan carries prompts, seeds and scores and finds the sources."""
    source = tmp_path / "captions.csv"
    source.write_text("caption,key\na red circle,k0.png\na blue square,k1.png\na small yellow star,o0.png\n")
    gen = tmp_path / "gen"
    found = run(folders["sd"], source, gen, "--batch_size", "2")
    train = tmp_path / "train"
    train.mkdir()
    for index in (0, 1):
        shutil.copy(gen / found["rows"][index]["file"], train / f"k{index}.png")
    noise = np.random.default_rng(0)
    for index in (0, 1):
        Image.fromarray(noise.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(train / f"o{index}.png")
    out = tmp_path / "scan"
    scan_main(["--generations", str(gen), "--training", str(train), "--out", str(out), "--descriptor.name", "pixel",
               "--k", "1", "--device", "cpu", "--progress", "false", "--dtype", "float32"])
    with open(out / "matches.csv", newline="") as handle:
        matches = {Path(r["generation"]).name: r for r in csv.DictReader(handle)}
    for row in found["rows"]:
        match = matches[Path(row["file"]).name]
        for column in ("prompt", "source_key", "seed", "variant"):
            assert match[column] == row[column], column
        for column in ("memorization_score", "memorization_score_first"):
            assert float(match[column]) == pytest.approx(float(row[column]), rel=1e-6)
    for index in (0, 1):
        planted = matches[Path(found["rows"][index]["file"]).name]
        assert Path(planted["training"]).name == f"k{index}.png" and float(planted["score"]) == pytest.approx(1.0)
        assert float(planted["source_similarity"]) == pytest.approx(1.0)
    assert "a small yellow star" in (out / "report.html").read_text()
