"""MoCo v3 with and without CutMix on BSDS300: train the tiny ViT of
``configs/demo_mocov3.yaml`` on the ``train/`` images with ``cutmix`` none / copy / mix
(same seed, so same initialisation, data order and step budget), log mAP per epoch on the
Cutmix set with :class:`callbacks.retrieval.RetrievalMetricsCallback`, then evaluate every
trained backbone (``lit export`` + ``lit test --model.init_args.descriptor.name mocov3``), the
untrained backbone (random-init floor) and ``pixel`` on the Segmix, Cutmix and Dif-Patch
sets built from ``val/`` exactly as ``benchmarks/table1_bsds.py`` builds them (its pieces
are reused: layout, set arguments, builds, ``lit report``). ``--out`` is a new folder.

    nice -n 10 .venv/bin/python benchmarks/mocov3_cutmix_bsds.py --data /path/to/bsds300 --seeds 0 1  # ~10-15 min
    nice -n 10 .venv/bin/python benchmarks/mocov3_cutmix_bsds.py --data /path/to/bsds300 \
        --datasets segmix cutmix                                                # no Dif-Patch build

Each fit is 160 steps at 32 px (5 epochs x 32 steps, batch 64; ~40 s on 2 free cores). The
untrained floor is the same module at the same seed saved before its first step.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import table1_bsds as t1  # noqa: E402
from benchmarks.data_layout import DATA_HELP, output_dir  # noqa: E402

DEFAULT_OUT_BASE = REPO / "runs" / "mocov3_cutmix"
CUTMIX_FORMS = ("none", "copy", "mix")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help=DATA_HELP)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mocov3_cutmix_work"),
                        help="sets, checkpoints, exports, run logs (outside the repository)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"small result files (default: a new folder under {DEFAULT_OUT_BASE})")
    parser.add_argument("--overwrite", action="store_true", help="allow an --out that already holds files")
    parser.add_argument("--forms", nargs="+", choices=CUTMIX_FORMS, default=list(CUTMIX_FORMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--datasets", nargs="+", choices=t1.DATASETS, default=list(t1.DATASETS))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10, help="passes over train/ per epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=32, help="training / descriptor input size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repaint-steps", type=int, default=10)
    parser.add_argument("--fresh", action="store_true", help="delete --work first (only if this script made it)")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> t1.Settings:
    """table1_bsds ``Settings`` for the set builds (set seed 0, 64 px random UNet for Dif-Patch)."""
    layout = t1.detect_layout(args.data.resolve(), None, None)
    return t1.Settings(layout, args.work.resolve(), 128, args.threads, None, 64, args.repaint_steps, 5, 2, 0)


def cutmix_set_args(settings: t1.Settings, unet: Path) -> dict[str, object]:
    """``CutmixDataModule`` init args of the built Cutmix set (so the callback reuses it)."""
    import yaml

    init = dict(yaml.safe_load((REPO / t1.CONFIGS["cutmix"]).read_text())["data"]["init_args"])
    for arg in t1.data_args("cutmix", settings, unet):
        key, value = arg.removeprefix("--data.init_args.").split("=", 1)
        init[key] = yaml.safe_load(value)
    return init


def train_config(args: argparse.Namespace, settings: t1.Settings, unet: Path, form: str, seed: int,
                 epochs: int) -> Path:
    """``configs/demo_mocov3.yaml`` pointed at BSDS ``train/`` with this CutMix form and seed."""
    import yaml

    config = yaml.safe_load((REPO / "configs" / "demo_mocov3.yaml").read_text())
    name = f"{form}_s{seed}"
    config["seed_everything"] = seed
    trainer = config["trainer"]
    trainer.update(accelerator="cpu", max_epochs=epochs, enable_checkpointing=False, enable_progress_bar=False,
                   log_every_n_steps=10)
    trainer["logger"] = {"class_path": "pytorch_lightning.loggers.CSVLogger",
                         "init_args": {"save_dir": str(settings.work / "train"), "name": name, "version": f"e{epochs}"}}
    callback = trainer["callbacks"][0]
    callback["init_args"]["datamodule"] = {"class_path": "datamodules.synthetic.cutmix.CutmixDataModule",
                                           "init_args": cutmix_set_args(settings, unet)}
    callback["init_args"]["batch_size"] = 50
    trainer["callbacks"] = [callback]
    model = config["model"]["init_args"]
    model.update(img_size=args.resolution, cutmix=form, augment_seed=seed)
    config["data"] = {"class_path": "datamodules.images.ImageFolderTrainData",
                      "init_args": {"root": str(settings.data.train_images), "resolution": args.resolution,
                                    "random_crop": False, "random_flip": False, "batch_size": args.batch_size,
                                    "repeats": args.repeats}}
    shutil.rmtree(settings.work / "train" / name / f"e{epochs}", ignore_errors=True)  # our own earlier run's logs
    path = settings.work / "configs" / f"{name}_e{epochs}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def fit_and_save(config: Path, ckpt: Path, threads: int) -> dict[str, float]:
    """``lit fit`` (in this forked child) from ``config``; save the final checkpoint to ``ckpt``."""
    import torch

    from lit.commands.lightning_cli import LitCLI

    torch.set_num_threads(threads)
    sys.argv = sys.argv[:1]
    cli = LitCLI(args=["-c", str(config)], run=False)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    cli.trainer.save_checkpoint(ckpt)
    return {"fit_s": round(seconds, 1), "steps": int(cli.trainer.global_step)}


def lit(args: list[str], log: Path, threads: int) -> float:
    """One ``python -m lit.commands.cli ...`` subprocess (output to ``log``); its wall time. Raises on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as handle:
        code = subprocess.run([sys.executable, "-m", "lit.commands.cli", *args], cwd=REPO, env=env, stdout=handle,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"lit {args[0]} failed (rc {code}); see {log}")
    return time.perf_counter() - start


def test_args(dataset: str, settings: t1.Settings, unet: Path, label: str, model: list[str]) -> list[str]:
    """``lit test`` arguments for one (set, descriptor): table1_bsds's data/trainer args, our model args."""
    run_name = [f"--model.init_args.run_name={label}"]
    return (["test", "-c", str(REPO / t1.CONFIGS[dataset])] + t1.data_args(dataset, settings, unet) + model
            + run_name + t1.trainer_args(dataset, label.replace(" ", "_").replace("/", "_"), settings))


def epoch_map(metrics_csv: Path) -> list[float]:
    """``retrieval/mAP`` per epoch from a CSVLogger file."""
    with metrics_csv.open(encoding="utf-8") as handle:
        return [float(row["retrieval/mAP"]) for row in csv.DictReader(handle) if row.get("retrieval/mAP")]


def main(argv: list[str] | None = None) -> None:
    """Build the sets, train every (form, seed), export, evaluate, report."""
    args = parse_args(argv)
    settings = settings_from(args)
    t1.claim_work(settings.work, args.fresh)
    out = output_dir(args.out, DEFAULT_OUT_BASE, args.overwrite)
    print(f"[out] {out}", flush=True)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    start = time.perf_counter()
    unet = settings.work / "unet_random64"
    if "dif_patch" in args.datasets:
        t1.in_fresh_process(t1.random_unet, unet, settings.resolution, settings.seed)
    needed = sorted(set(args.datasets) | {"cutmix"})
    for dataset in needed:
        build = t1.in_fresh_process(t1.build_set, dataset, settings, unet)
        print(f"[build] {json.dumps(build)}", flush=True)

    exports: dict[str, Path] = {}
    curves: dict[str, list[float]] = {}
    fits: dict[str, dict[str, float]] = {}
    for seed in args.seeds:
        floor_cfg = train_config(args, settings, unet, "none", seed, 0)
        floor_ckpt = settings.work / "ckpt" / f"init_s{seed}.ckpt"
        floor_ckpt.parent.mkdir(parents=True, exist_ok=True)
        t1.in_fresh_process(fit_and_save, floor_cfg, floor_ckpt, args.threads)
        jobs = [(f"tiny ViT random init (s{seed})", floor_ckpt)]
        for form in args.forms:
            config = train_config(args, settings, unet, form, seed, args.epochs)
            ckpt = settings.work / "ckpt" / f"{form}_s{seed}.ckpt"
            print(f"[fit] cutmix={form} seed={seed} ...", flush=True)
            fit = t1.in_fresh_process(fit_and_save, config, ckpt, args.threads)
            name = f"{form}_s{seed}"
            curves[name] = epoch_map(settings.work / "train" / name / f"e{args.epochs}" / "metrics.csv")
            fits[name] = fit
            print(f"[fit] {name}: {fit}  mAP/epoch (Cutmix set) {[round(v, 4) for v in curves[name]]}", flush=True)
            jobs.append((f"MoCo v3 cutmix={form} (s{seed})", ckpt))
        for label, ckpt in jobs:
            target = settings.work / "export" / f"{ckpt.stem}.safetensors"
            lit(["export", "--ckpt_path", str(ckpt), "--out", str(target), "--overwrite"],
                settings.work / "logs" / f"export_{ckpt.stem}.log", args.threads)
            exports[label] = target

    evals = [("pixel", ["--model.init_args.descriptor.name=pixel"])]
    evals += [(label, ["--model.init_args.descriptor.name=mocov3", f"--model.init_args.descriptor.weights={path}"])
              for label, path in exports.items()]
    timings = []
    shutil.rmtree(settings.work / "runs", ignore_errors=True)  # our own earlier runs' logs (lit test refuses them)
    for dataset in args.datasets:
        for label, model in evals:
            seconds = lit(test_args(dataset, settings, unet, label, model),
                          settings.work / "logs" / f"test_{dataset}_{label.replace(' ', '_')}.log", args.threads)
            timings.append({"dataset": dataset, "descriptor": label, "wall_s": round(seconds, 1)})
            print(f"[test] {dataset} / {label}: {seconds:.1f} s", flush=True)
    table = t1.report(settings, out)
    total = time.perf_counter() - start
    lines = ["# MoCo v3 +- CutMix on BSDS300-built sets\n", table,
             "\n## mAP per epoch on the Cutmix set (RetrievalMetricsCallback)\n",
             t1.markdown([{"run": k, "fit_s": fits[k]["fit_s"], "steps": fits[k]["steps"],
                           **{f"e{i + 1}": round(100 * v, 2) for i, v in enumerate(c)}} for k, c in curves.items()],
                         ["run", "fit_s", "steps", *[f"e{i + 1}" for i in range(args.epochs)]]),
             "\n## lit test wall time (s)\n", t1.markdown(timings, ["dataset", "descriptor", "wall_s"]),
             f"\nTotal wall time: {total / 60:.1f} min\n"]
    (out / "summary.md").write_text("\n".join(lines), encoding="utf-8")
    (out / "run_info.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "curves": curves, "fits": fits, "timings": timings,
         "total_s": round(total, 1)}, indent=1) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
