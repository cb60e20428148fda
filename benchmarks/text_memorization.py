"""Evidence for issue 16: controlled duplication and the mitigations of the follow-up study
("Understanding and Mitigating Copying in Diffusion Models", Somepalli et al., NeurIPS 2023) on
the suite's small text-conditioned CPU setting.

Each row trains ``configs/demo_text.yaml``'s model on procedural captioned scenes with the same
budget (``--steps``), for every seed, and reads the TextReplicationMonitor's last check
(``text_replication_history.csv``): the share of generations that reproduce their own caption's
training image and rate@0.5 for duplicated and unique captions, the 95th percentile of top-1
similarity (the study's headline), the memorization score's AUC (duplicated vs unique captions),
and the training time. Rows:

- ``none``: no duplication;
- ``dup_same``: ``--dup_fraction`` of the images drawn ``--dup_weight`` times as often, same caption;
- ``dup_varied``: the same, each draw with one of the image's captions;
- then each mitigation on ``dup_same``: ``multiple_captions`` (every image trains with one of its
  captions), ``caption_replacement`` (p 0.4, four random words), ``token_addition`` (p 0.4, 2 words),
  ``word_repetition`` (p 0.4, 2 words), ``embedding_noise`` (0.1), ``embedding_mixup`` (alpha 5, as
  the study's ``mixup_noise_lam``);
- inference-time mitigations on ``dup_same``'s exported pipeline (``--inference``): ``lit generate``
  from the monitor's 32 pairs' captions (keyed by their training image), plain
  (``generate_plain``), with ``--embedding_noise 0.1`` (``generate_embedding_noise``) and with
  ``--random_words 4`` (``generate_random_words``), each searched by ``lit scan`` against the run's
  ``training_images/`` (pixel descriptor): own-image share and rate@0.5 per group, p95 and the
  score's AUC, computed from ``matches.csv`` with the suite's own functions.

    .venv/bin/python benchmarks/text_memorization.py --jobs 2 --out benchmarks/results/text_memorization
    .venv/bin/python benchmarks/text_memorization.py --steps 40 --rows none dup_same --seeds 0   # smoke run

Runs go in parallel (``--jobs``, one thread each); a finished run (its ``result.json``) is reused
when the config it records is the same, so a killed benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


import torch
import yaml

from lit.files import claim_folder
from lit.replication import replication_stats
from lit.text_replication import group_statistics

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "demo_text.yaml"
#: Marks the folders this script writes (``--out`` and one per run); it changes nothing elsewhere.
MARKER = ".lit-text-memorization"

#: Row name -> (data init_args, model init_args) changed from the duplicated setting.
MITIGATIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "multiple_captions": ({"captions_per_image": None, "dup_caption": "varied"}, {}),
    "caption_replacement": ({"caption_replacement": 0.4}, {}),
    "token_addition": ({"token_addition": 0.4, "token_addition_count": 2}, {}),
    "word_repetition": ({"word_repetition": 0.4, "word_repetition_count": 2}, {}),
    "embedding_noise": ({}, {"embedding_noise": 0.1}),
    "embedding_mixup": ({}, {"embedding_mixup": 5.0}),
}
ROWS = ("none", "dup_same", "dup_varied", *MITIGATIONS)
#: Inference rows: lit generate options on dup_same's pipeline.
INFERENCE: dict[str, list[str]] = {
    "generate_plain": [],
    "generate_embedding_noise": ["--embedding_noise", "0.1"],
    "generate_random_words": ["--random_words", "4"],
}


def row_config(row: str, seed: int, steps: int, images: int, dup_fraction: float, dup_weight: float,
               out: Path) -> dict[str, Any]:
    """The demo config with this row's data and model settings, the budget and the seed."""
    config = yaml.safe_load(BASE_CONFIG.read_text())
    config["seed_everything"] = seed
    trainer = config["trainer"]
    trainer.update({"max_steps": steps, "enable_progress_bar": False, "enable_checkpointing": False})
    trainer["logger"]["init_args"].update({"save_dir": str(out), "name": "run", "version": 0})
    trainer["callbacks"] = [c for c in trainer["callbacks"] if "TextReplicationMonitor" in c["class_path"]]
    monitor = trainer["callbacks"][0]["init_args"]
    monitor.update({"every_n_steps": steps, "check_at_start": False, "verbose": False})
    data, model = config["data"]["init_args"], config["model"]["init_args"]
    model["export_on_fit_end"] = "pipeline" if row == "dup_same" else None  # lit generate reads it (--inference)
    data.update({"procedural": images, "seed": seed, "dup_fraction": dup_fraction, "dup_weight": dup_weight,
                 "dup_caption": "same"})
    if row == "none":
        data["dup_fraction"] = 0.0
    elif row == "dup_varied":
        data["dup_caption"] = "varied"
    elif row in MITIGATIONS:
        data_changes, model_changes = MITIGATIONS[row]
        data.update(data_changes)
        model.update(model_changes)
    elif row != "dup_same":
        raise ValueError(f"unknown row {row!r}; rows: {', '.join(ROWS)}")
    return config


def run_one(row: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one row with one seed (or reuse its finished result) and read the monitor's last check."""
    out = args.out / f"{row}_seed{seed}"
    config = row_config(row, seed, args.steps, args.images, args.dup_fraction, args.dup_weight, out)
    result_file = out / "result.json"
    if result_file.is_file():
        saved = json.loads(result_file.read_text())
        if saved.get("config") == config:
            return saved
    prepare_run_folder(out, ("run",))
    config_file = out / "fit.yaml"
    config_file.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    _lit(["fit", "-c", str(config_file)], out, args.threads, log=out / "fit.log")
    seconds = time.perf_counter() - started
    history = list(csv.DictReader((out / "run" / "version_0" / "text_replication_history.csv").open()))
    last = {k: float(v) for k, v in history[-1].items() if v not in ("", None)}
    result = {"row": row, "seed": seed, "seconds": seconds, "last": last, "config": config}
    result_file.write_text(json.dumps(result, indent=1))
    return result


def prepare_run_folder(out: Path, leftovers: tuple[str, ...]) -> None:
    """Claim ``out`` for this script (a user's non-empty folder is refused in one line, untouched)
    and remove the ``leftovers`` an earlier, unfinished or differently set run of it wrote there;
    nothing else in the folder is touched."""
    claim_folder(out, MARKER, label=str(out), note="made by benchmarks/text_memorization.py\n")
    for name in leftovers:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)  # written by this script's own lit fit / generate / scan in a claimed folder
        elif path.exists():
            path.unlink()


def _lit(args: list[str], cwd: Path, threads: int, log: Path | None = None) -> None:
    """Run ``lit ARGS`` in ``cwd`` with ``threads`` torch threads; its output goes to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "lit.commands.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)
    if log is not None:
        log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"lit {args[0]} in {cwd} failed: {(done.stdout + done.stderr).strip().splitlines()[-1:]}")


def run_inference(name: str, trained: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``lit generate`` from the monitor's pairs on a trained dup_same pipeline with one inference
    setting, ``lit scan`` against its training images, and the monitor's statistics from ``matches.csv``."""
    run = args.out / f"dup_same_seed{trained['seed']}" / "run" / "version_0"
    out = args.out / f"{name}_seed{trained['seed']}"
    result_file = out / "result.json"
    if result_file.is_file():
        saved = json.loads(result_file.read_text())
        if saved.get("options") == INFERENCE[name] and saved.get("trained") == trained["seconds"]:
            return saved
    prepare_run_folder(out, ("gen", "scan", "captions.csv"))
    pairs = list(csv.DictReader((run / "monitor_pairs.csv").open()))
    with open(out / "captions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["caption", "key"])
        writer.writerows([pair["caption"], pair["key"]] for pair in pairs)
    started = time.perf_counter()
    _lit(["generate", "--pipeline", str(run / "pipeline"), "--prompts", "captions.csv", "--out", "gen", "--steps", "20",
          "--guidance", "3.0", "--seed", str(trained["seed"]), "--no_progress", *INFERENCE[name]], out, args.threads)
    _lit(["scan", "--generations", "gen", "--training", str(run / "training_images"), "--descriptor.name", "pixel",
          "--out", "scan", "--device", "cpu", "--k", "1"], out, args.threads)
    seconds = time.perf_counter() - started
    rows = {Path(r["generation"]).name: r for r in csv.DictReader((out / "scan" / "matches.csv").open())
            if r["rank"] == "1"}
    generations = list(csv.DictReader((out / "gen" / "generations.csv").open()))
    top1 = torch.tensor([float(rows[Path(g["file"]).name]["score"]) for g in generations])
    own = torch.tensor([Path(rows[Path(g["file"]).name]["training"]).stem == g["source_key"] for g in generations])
    scores = torch.tensor([float(g["memorization_score"]) for g in generations])
    first = torch.tensor([float(g["memorization_score_first"]) for g in generations])
    duplicated = torch.tensor([pairs[int(g["prompt_index"])]["group"] == "duplicated" for g in generations])
    last = group_statistics(top1, own, scores, first, duplicated, [0.5])
    last["top1_p95"] = replication_stats(top1, [0.5]).p95
    result = {"row": name, "seed": trained["seed"], "seconds": seconds, "last": last, "options": INFERENCE[name],
              "trained": trained["seconds"]}
    result_file.write_text(json.dumps(result, indent=1))
    return result


COLUMNS = (
    ("own dup", "duplicated/own_share"), ("own uniq", "unique/own_share"),
    (">0.5 dup", "duplicated/rate@0.5"), (">0.5 uniq", "unique/rate@0.5"),
    ("p95 top-1", "top1_p95"), ("score AUC", "memorization/auc_duplicated"),
)


def _cell(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    spread = (max(values) - min(values)) / 2
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {spread:.3f}"


def table(results: list[dict[str, Any]], rows: list[str]) -> str:
    """Markdown: one line per row, mean ± half the range over seeds."""
    lines = ["| setting | " + " | ".join(name for name, _ in COLUMNS) + " | time |",
             "|---|" + "---|" * (len(COLUMNS) + 1)]
    for row in rows:
        runs = [r for r in results if r["row"] == row]
        if not runs:
            continue
        cells = [_cell([r["last"].get(key, math.nan) for r in runs]) for _, key in COLUMNS]
        seconds = sum(r["seconds"] for r in runs) / len(runs)
        what = "generate + scan" if row in INFERENCE else "training"
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {seconds / 60:.1f} min {what} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--inference", action="store_true",
                        help="also the inference-time mitigations on dup_same's pipeline (trains dup_same if needed)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run (the same for every row)")
    parser.add_argument("--images", type=int, default=64, help="procedural training scenes")
    parser.add_argument("--dup_fraction", type=float, default=0.0625)
    parser.add_argument("--dup_weight", type=float, default=25.0)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "text_memorization")
    args = parser.parse_args()
    args.out = args.out.resolve()
    claim_folder(args.out, MARKER, label=f"--out {args.out}", note="made by benchmarks/text_memorization.py\n")
    started = time.perf_counter()
    plan = [(row, seed) for seed in args.seeds for row in args.rows]
    results = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, row, seed, args): (row, seed) for row, seed in plan}
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            results.append(result)
            print(f"{result['row']} seed {result['seed']}: {result['seconds'] / 60:.1f} min, own dup "
                  f"{result['last'].get('duplicated/own_share', math.nan):.3f}, own uniq "
                  f"{result['last'].get('unique/own_share', math.nan):.3f}", flush=True)
    rows = list(args.rows)
    if args.inference:
        trained = {r["seed"]: r for r in results if r["row"] == "dup_same"}
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            missing = [s for s in args.seeds if s not in trained]
            for result in pool.map(lambda s: run_one("dup_same", s, args), missing):
                trained[result["seed"]] = result
            for result in pool.map(lambda job: run_inference(job[0], trained[job[1]], args),
                                   [(name, seed) for seed in args.seeds for name in INFERENCE]):
                results.append(result)
        rows += list(INFERENCE)
    text = table(results, rows)
    header = (f"{args.images} procedural scenes at 16 px, {args.steps} steps of batch 16, seeds {args.seeds}; "
              f"duplication: {args.dup_fraction:g} of the images x{args.dup_weight:g}; "
              f"monitor: 32 fixed (caption, seed) pairs, pixel descriptor; wall {(time.perf_counter() - started) / 60:.1f} min")
    print(header + "\n" + text)
    (args.out / "table.md").write_text(header + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
