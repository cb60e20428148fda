"""``lit scan`` end to end on tiny folders, against a brute-force numpy reference; and ``run_scan``
on in-memory features (streamed in small blocks) against elementwise references."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from datamodules.procedural import ProceduralScenes
from lit.commands.scan.command import main
from lit.commands.scan.engine import run_scan
from lit.commands.scan.options import build_parser
from lit.commands.scan.sources import MemorySource
from lit.commands.scan.types import ScanOptions
from lit.errors import UserError

SIZE = 32  # the pixel descriptor's input size: no resizing, so the reference is plain numpy


def _save(image: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 training scenes in 3 class folders; 8 generations (3 copies, 1 mirrored copy, 4 new scenes)
    and one corrupt file, also listed with their prompts in gen.tsv."""
    root = tmp_path_factory.mktemp("scan_folders")
    training = ProceduralScenes(24, SIZE, seed=11)
    for i in range(24):
        _save(training[i]["image"], root / "train" / f"class{i % 3}" / f"t{i:02d}.png")
    new = ProceduralScenes(4, SIZE, seed=12)
    for i in range(3):
        _save(training[5 * i]["image"], root / "gen" / f"copy{i}.png")
    _save(training[7]["image"].flip(-1), root / "gen" / "mirror7.png")
    for i in range(4):
        _save(new[i]["image"], root / "gen" / f"new{i}.png")
    (root / "gen" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    lines = [f"gen/{p.name}\ta prompt for {p.stem}" for p in sorted((root / "gen").glob("*.png"))]
    (root / "gen.tsv").write_text("\n".join(lines) + "\n")
    return root


def _pixel_features(paths: list[Path]) -> np.ndarray:
    """The pixel descriptor, independently: RGB bytes / 255 in CHW order, minus the mean, L2-normalised."""
    rows = []
    for path in paths:
        x = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).transpose(2, 0, 1).reshape(-1) / 255.0
        x = x - x.mean()
        rows.append(x / np.linalg.norm(x))
    return np.stack(rows)


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


@pytest.fixture(scope="module")
def scanned(folders: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scan_out") / "out"
    main(["--generations", str(folders / "gen.tsv"), "--training", str(folders / "train"), "--out", str(out),
          "--descriptor.name", "pixel", "--k", "3", "--dtype", "float32", "--device", "cpu", "--batch_size", "8",
          "--report_rows", "4", "--thumb", "32", "--progress", "false"])
    return out


def test_matches_equal_brute_force(folders: Path, scanned: Path) -> None:
    gen_paths = sorted(p for p in (folders / "gen").glob("*.png") if p.name != "broken.png")
    train_paths = sorted((folders / "train").rglob("*.png"))
    scores = _pixel_features(gen_paths) @ _pixel_features(train_paths).T
    order, top = _top_k(scores, 3)
    with open(scanned / "matches.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(gen_paths) * 3
    assert set(rows[0]) == {"generation", "rank", "training", "score", "generation_caption", "training_label"}
    for g, path in enumerate(gen_paths):
        mine = [r for r in rows if r["generation"] == f"gen/{path.name}"]  # list keys: paths as listed
        assert [int(r["rank"]) for r in mine] == [1, 2, 3]
        assert [r["training"] for r in mine] == [str(train_paths[j]) for j in order[g]]
        assert [float(r["score"]) for r in mine] == pytest.approx(top[g].tolist(), abs=1e-5)
        assert mine[0]["training_label"] == train_paths[order[g][0]].parent.name
        assert mine[0]["generation_caption"] == f"a prompt for {path.stem}"
    copies = {r["generation"]: r["training"] for r in rows if r["rank"] == "1" and "copy" in r["generation"]}
    assert copies["gen/copy1.png"].endswith("t05.png")


def test_summary_fields(folders: Path, scanned: Path) -> None:
    summary = json.loads((scanned / "summary.json").read_text())
    gen_paths = sorted(p for p in (folders / "gen").glob("*.png") if p.name != "broken.png")
    train_paths = sorted((folders / "train").rglob("*.png"))
    train = _pixel_features(train_paths)
    top1 = (_pixel_features(gen_paths) @ train.T).max(axis=1)
    self_scores = train @ train.T
    np.fill_diagonal(self_scores, -np.inf)
    baseline = self_scores.max(axis=1)
    assert summary["generations"]["count"] == 8 and summary["training"]["count"] == 24
    assert summary["generations"]["skipped"] == 1
    assert summary["generations"]["skipped_files"][0].endswith("broken.png")
    assert list(summary["top1"]["rates"]) == ["0.5", "0.7", "0.8", "0.9", "0.95"]
    for t, rate in summary["top1"]["rates"].items():
        assert rate == pytest.approx(float(np.mean(top1 > float(t))))
    assert summary["top1"]["rates"]["0.95"] >= 3 / 8  # the three exact copies
    assert summary["top1"]["median"] == pytest.approx(float(np.median(top1)), abs=1e-5)
    assert summary["baseline"]["exact"] is True and summary["baseline"]["sample_size"] == 24
    assert summary["baseline"]["mean"] == pytest.approx(float(baseline.mean()), abs=1e-5)
    assert summary["baseline"]["p95"] == pytest.approx(float(np.percentile(baseline, 95)), abs=1e-5)
    assert summary["descriptor"]["name"] == "pixel"
    assert summary["stores"]["training"]["kind"] == "store"
    assert summary["stores"]["training"]["num_rows"] == 24
    assert summary["normalization"] == {"method": "none"}
    assert summary["classes"]["num_classes"] == 3
    assert summary["classes"]["generation_classes"] == "label of the top-1 training match"
    assert summary["duplicates"]["top_matches"]["count"] == 8
    for name in ("similarity_histogram.png", "duplicates.png", "classes.png", "report.html"):
        assert (scanned / name).stat().st_size > 1000


def test_report_is_self_contained(scanned: Path) -> None:
    text = (scanned / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert len(sources) == 4 * 4 + 3  # 4 rows of generation + 3 matches, 3 plots
    assert all(s.startswith("data:image/") for s in sources)
    assert 'href="matches.csv"' in text and 'href="summary.json"' in text
    assert "a prompt for copy" in text  # captions shown


def test_second_run_reuses_stores_and_stores_are_inputs(folders: Path, scanned: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    stores = sorted((scanned / "stores").iterdir())
    stamps = {p: p.joinpath("manifest.json").stat().st_mtime_ns for p in stores}
    before = (scanned / "matches.csv").read_text()
    args = ["--out", str(scanned), "--k", "3", "--dtype", "float32", "--device", "cpu", "--report_rows", "2",
            "--thumb", "16", "--progress", "false"]
    main(["--generations", str(folders / "gen.tsv"), "--training", str(folders / "train"), *args])
    assert capsys.readouterr().out.count("reused feature store") == 2
    assert {p: p.joinpath("manifest.json").stat().st_mtime_ns for p in stores} == stamps
    assert (scanned / "matches.csv").read_text() == before
    gen_store = next(p for p in stores if p.name.startswith("generations"))
    train_store = next(p for p in stores if p.name.startswith("training"))
    main(["--generations", str(gen_store), "--training", str(train_store), *args])
    assert (scanned / "matches.csv").read_text() == before


def test_refuses_foreign_out(folders: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=re.escape(str(tmp_path))):
        main(["--generations", str(folders / "gen"), "--training", str(folders / "train"), "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("extra, message", [
    (["--k", "0"], "--k must be >= 1"),
    (["--dtype", "int8"], "--dtype must be one of"),
    (["--gen", "x"], "unrecognized arguments"),
    (["--descriptor.name", "nonexistent"], "--descriptor.name: unknown descriptor 'nonexistent'; available: "),
    (["--descriptor.name", "sscd_resnet50", "--descriptor.weights", "/no/such/sscd.pt"],
     "--descriptor.weights: weights file not found: /no/such/sscd.pt (expected the SSCD TorchScript file"),
    (["--descriptor.token_normalization", "l2"], "descriptor.token_normalization"),
    (["--descriptor", "pixel"], "name the descriptor with --descriptor.name NAME"),  # the flat spelling of before
    (["--match_mirrors", "true", "--index", "IVF4,Flat"], "--index searches the training store only"),
])
def test_user_errors(folders: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        main(["--generations", str(folders / "gen"), "--training", str(folders / "train"),
              "--out", str(tmp_path / "out"), *extra])


def _mirrored_pixel_features(paths: list[Path]) -> np.ndarray:
    """:func:`_pixel_features` of the horizontally flipped images."""
    rows = []
    for path in paths:
        x = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)[:, ::-1].transpose(2, 0, 1).reshape(-1)
        x = (x / 255.0) - (x / 255.0).mean()
        rows.append(x / np.linalg.norm(x))
    return np.stack(rows)


def test_match_mirrors_end_to_end(folders: Path, tmp_path: Path) -> None:
    """--match_mirrors: a training image scores through the better of itself and its mirror (numpy
    reference), the mirrored copy of t07 is found as such, and every output says so."""
    out = tmp_path / "out"
    main(["--generations", str(folders / "gen"), "--training", str(folders / "train"), "--out", str(out),
          "--match_mirrors", "true", "--k", "2", "--dtype", "float32", "--device", "cpu", "--progress", "false",
          "--thumb", "16", "--report_rows", "2"])
    gen_paths = sorted(p for p in (folders / "gen").glob("*.png") if p.name != "broken.png")
    train_paths = sorted((folders / "train").rglob("*.png"))
    train, flipped = _pixel_features(train_paths), _mirrored_pixel_features(train_paths)
    gens = _pixel_features(gen_paths)
    best = np.maximum(gens @ train.T, gens @ flipped.T)
    order, top = _top_k(best, 2)
    with open(out / "matches.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert "mirrored" in rows[0]
    for g, path in enumerate(gen_paths):
        mine = [r for r in rows if r["generation"] == str(path)]
        assert [r["training"] for r in mine] == [str(train_paths[j]) for j in order[g]]
        assert [float(r["score"]) for r in mine] == pytest.approx(top[g].tolist(), abs=1e-5)
    mirror = next(r for r in rows if r["generation"].endswith("mirror7.png") and r["rank"] == "1")
    assert mirror["training"].endswith("t07.png") and mirror["mirrored"] == "1" and float(mirror["score"]) > 0.999
    summary = json.loads((out / "summary.json").read_text())
    assert summary["match_mirrors"] is True
    self_best = np.maximum(train @ train.T, train @ flipped.T)
    np.fill_diagonal(self_best, -np.inf)  # its own mirror is left out with it
    assert summary["baseline"]["mean"] == pytest.approx(float(self_best.max(axis=1).mean()), abs=1e-5)
    assert "Mirror-aware matching: on" in (out / "report.html").read_text()


def test_missing_input_is_a_user_error(folders: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--training .*not found"):
        main(["--generations", str(folders / "gen"), "--training", str(tmp_path / "nope"),
              "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "stores").exists()  # checked before anything is extracted


# ----------------------------------------------------------------------------- run_scan on tensors


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=1, keepdim=True)


def _memory(name: str, features: torch.Tensor, labels: list[str] | None = None) -> MemorySource:
    return MemorySource(name, features, [f"{name}{i}" for i in range(features.shape[0])], labels=labels)


def _reference_scores(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Cosine from explicit elementwise products in float64 (no BLAS)."""
    q, g = _unit(q.double()), _unit(g.double())
    return (q[:, None, :] * g[None, :, :]).sum(-1)


@pytest.mark.parametrize("chunk_bytes", [None, 4 * 8 * 3], ids=["one-query-chunk", "3-row-query-chunks"])
def test_run_scan_streams_blocks_like_brute_force(chunk_bytes: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if chunk_bytes is not None:
        monkeypatch.setattr("lit.replication.QUERY_CHUNK_BYTES", chunk_bytes)
    generator = torch.Generator().manual_seed(5)
    train = torch.randn(53, 8, generator=generator)
    train[10] = train[3] * 2.0  # a duplicate pair (cosine 1)
    train[11] = train[3] + 0.01 * torch.randn(8, generator=generator)
    gens = torch.cat([train[[3, 20]] + 0.001, torch.randn(5, 8, generator=generator)])
    labels = [f"c{i % 4}" for i in range(53)]
    options = ScanOptions(k=4, block_rows=7, baseline_sample=None, random_sample=20, progress=False)
    result = run_scan(_memory("g", gens), _memory("t", train, labels), options)

    scores = _reference_scores(gens, train)
    assert torch.allclose(result.top.scores.double(), torch.sort(scores, dim=1, descending=True).values[:, :4],
                          atol=1e-5)
    assert result.top.indices[:, 0].tolist() == scores.argmax(dim=1).tolist()

    self_scores = _reference_scores(train, train)
    self_scores.fill_diagonal_(float("-inf"))
    assert torch.allclose(result.baseline.double(), self_scores.max(dim=1).values, atol=1e-5)

    duplicates = (self_scores > 0.95).sum(dim=1)
    assert result.match_duplicates.tolist() == duplicates[result.top.indices[:, 0]].tolist()
    assert result.match_duplicates[0].item() == 2  # generation 0 copies row 3, which rows 10 and 11 duplicate
    assert result.random_duplicates.tolist() == duplicates[result.random_rows.rows].tolist()
    assert result.random_rows.rows.numel() == 20 and not result.random_rows.exact

    # per class: within-class top-1 from the reference, classes of the generations' top matches
    within = {}
    for c in range(4):
        rows = [i for i in range(53) if i % 4 == c]
        block = self_scores[rows][:, rows]
        within[f"c{c}"] = float(block.max(dim=1).values.mean())
    assert result.classes is not None
    for label, mean in zip(result.classes.classes, result.classes.mean_within.tolist()):
        assert mean == pytest.approx(within[label], abs=1e-5)
    best: dict[str, float] = {}
    for g in range(gens.shape[0]):
        label = labels[int(scores[g].argmax())]
        best[label] = max(best.get(label, -1.0), float(scores[g].max()))
    assert dict(zip(result.classes.classes, result.classes.max_generation.tolist())) == pytest.approx(
        {c: best[c] for c in result.classes.classes}, abs=1e-5)


def test_run_scan_sampled_baseline_and_normalisation() -> None:
    generator = torch.Generator().manual_seed(6)
    train = torch.randn(40, 6, generator=generator)
    gens = torch.randn(6, 6, generator=generator)
    background = torch.randn(15, 6, generator=generator)
    options = ScanOptions(k=2, block_rows=9, baseline_sample=12, random_sample=5, norm_k=3, norm_beta=0.5,
                          progress=False)
    result = run_scan(_memory("g", gens), _memory("t", train), options, background=_memory("b", background))
    assert result.baseline_sample.record()["sample_size"] == 12 and not result.baseline_sample.exact
    self_scores = _reference_scores(train, train)
    self_scores.fill_diagonal_(float("-inf"))
    expected = self_scores.max(dim=1).values[result.baseline_sample.rows]
    assert torch.allclose(result.baseline.double(), expected, atol=1e-5)
    bias = torch.sort(_reference_scores(gens, background), dim=1, descending=True).values[:, :3].mean(dim=1)
    assert result.normalized is not None
    assert torch.allclose(result.normalized.double(), result.top.scores.double() - 0.5 * bias[:, None], atol=1e-5)
    assert result.normalization is not None and result.normalization["k"] == 3
    assert result.classes is None


# ----------------------------------------------------------------------------- configs

SCAN_CONFIGS = [c for c in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
                if "model" not in (yaml.safe_load(c.read_text()) or {})]


@pytest.mark.parametrize("config", SCAN_CONFIGS, ids=lambda c: c.name)
def test_scan_config_prints_every_option(config: Path, capsys: pytest.CaptureFixture[str]) -> None:

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    source = yaml.safe_load(config.read_text())
    assert source and printed == {**printed, **source}  # every key of the file, with its value


def test_scan_config_has_a_scan_config() -> None:
    assert any(c.name == "scan.yaml" for c in SCAN_CONFIGS)


def test_webdataset_training_shard(tmp_path: Path) -> None:
    """A LAION-layout tar (key.png + key.txt) as the training set: keys, captions, thumbnails from the tar."""
    import io
    import tarfile

    scenes = ProceduralScenes(12, SIZE, seed=21)
    with tarfile.open(tmp_path / "train-000.tar", "w") as archive:
        for i in range(12):
            buffer = io.BytesIO()
            array = (scenes[i]["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(array).save(buffer, format="PNG")
            for suffix, data in (("png", buffer.getvalue()), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:05d}.{suffix}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    _save(scenes[6]["image"], tmp_path / "gen" / "copy6.png")
    _save(ProceduralScenes(1, SIZE, seed=22)[0]["image"], tmp_path / "gen" / "new.png")
    out = tmp_path / "out"
    main(["--generations", str(tmp_path / "gen"), "--training", str(tmp_path / "train-000.tar"), "--out", str(out),
          "--k", "2", "--device", "cpu", "--progress", "false", "--thumb", "16"])
    with open(out / "matches.csv", newline="") as handle:
        rows = {r["generation"]: r for r in csv.DictReader(handle) if r["rank"] == "1"}
    copy = rows[str(tmp_path / "gen" / "copy6.png")]
    assert copy["training"] == "00006" and copy["training_caption"] == "caption 6"
    assert float(copy["score"]) > 0.99
    report = (out / "report.html").read_text()
    assert "placeholder" not in report and "caption 6" in report


def test_run_scan_on_token_features_uses_split_product() -> None:
    """(N, T, D) features: scores are max over tokens of per-token cosine (token normalisation)."""
    generator = torch.Generator().manual_seed(7)
    train = torch.randn(19, 3, 5, generator=generator)
    gens = torch.cat([train[[4]] * 1.5, torch.randn(3, 3, 5, generator=generator)])
    options = ScanOptions(k=3, block_rows=6, baseline_sample=None, random_sample=4, progress=False)
    result = run_scan(_memory("g", gens), _memory("t", train), options)
    q = gens.double() / gens.double().norm(dim=-1, keepdim=True)
    g = train.double() / train.double().norm(dim=-1, keepdim=True)
    reference = (q[:, None, :, :] * g[None, :, :, :]).sum(-1).max(dim=-1).values  # (Q, G)
    assert torch.allclose(result.top.scores.double(), torch.sort(reference, dim=1, descending=True).values[:, :3],
                          atol=1e-5)
    assert result.top.indices[0, 0].item() == 4
    self_ref = (g[:, None] * g[None, :]).sum(-1).max(dim=-1).values
    self_ref.fill_diagonal_(float("-inf"))
    assert torch.allclose(result.baseline.double(), self_ref.max(dim=1).values, atol=1e-5)
    assert result.match_duplicates.tolist() == (self_ref > 0.95).sum(dim=1)[result.top.indices[:, 0]].tolist()


def test_background_normalisation_end_to_end(folders: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    main(["--generations", str(folders / "gen"), "--training", str(folders / "train"), "--out", str(out),
          "--background", str(folders / "train"), "--norm_k", "2", "--norm_beta", "0.5", "--k", "2",
          "--dtype", "float32", "--device", "cpu", "--progress", "false", "--thumb", "16"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["normalization"]["method"] == "sscd"
    assert summary["normalization"]["k"] == 2 and summary["normalization"]["beta"] == 0.5
    assert summary["normalization"]["background_rows"] == 24
    with open(out / "matches.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    train = _pixel_features(sorted((folders / "train").rglob("*.png")))
    for row in rows[:4]:
        gen = _pixel_features([Path(row["generation"])])
        bias = np.sort(gen @ train.T, axis=1)[0, ::-1][:2].mean()  # the background is the training set here
        assert float(row["score_normalized"]) == pytest.approx(float(row["score"]) - 0.5 * bias, abs=1e-5)
    assert "Scores normalised (SSCD)" in (out / "report.html").read_text()
    assert summary["top1_normalized"]["count"] == 8


def test_store_of_another_descriptor_is_refused(scanned: Path, tmp_path: Path) -> None:
    train_store = next(p for p in (scanned / "stores").iterdir() if p.name.startswith("training"))
    with pytest.raises(UserError, match="does not match the descriptor of this scan.*input_size 32 vs 16"):
        main(["--generations", str(train_store), "--training", str(train_store), "--out", str(tmp_path / "out"),
              "--descriptor.input_size", "16"])


# ----------------------------------------------------------------------------- issue 14: a scan you can trust
# (every argument checked before work starts, outputs never inputs, one writer, outputs together, order)


@pytest.mark.parametrize("extra, message", [
    (["--thresholds", "[]"], "--thresholds needs at least one threshold in [-1, 1]"),
    (["--thresholds", "[0.5, 1.5]"], "--thresholds: 1.5 is not a similarity"),
    (["--thresholds", "[-1.01]"], "--thresholds: -1.01 is not a similarity"),
    (["--thresholds", "[0.5, 0.5]"], "--thresholds: each threshold once"),
    (["--duplicate_threshold", "1.2"], "--duplicate_threshold: 1.2 is not a similarity"),
])
def test_arguments_checked_before_any_work(folders: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    """Out-of-range or missing thresholds are one line naming the option, and no folder is made."""
    with pytest.raises(UserError, match=re.escape(message)):
        main(["--generations", str(folders / "gen"), "--training", str(folders / "train"),
              "--out", str(tmp_path / "out"), "--device", "cpu", "--progress", "false", *extra])
    assert not (tmp_path / "out").exists()


def test_unreadable_weights_name_the_weights_option_and_leave_no_folder(folders: Path, tmp_path: Path) -> None:
    """A weights file that exists but cannot be loaded is blamed on --descriptor.weights (not on
    --generations, the first input extracted) before the output folder is made."""
    weights = tmp_path / "sscd.pt"
    weights.write_bytes(b"")
    with pytest.raises(UserError, match=r"^--descriptor\.weights: unreadable weights file"):
        main(["--generations", str(folders / "gen"), "--training", str(folders / "train"),
              "--out", str(tmp_path / "out"), "--descriptor.name", "sscd_resnet50",
              "--descriptor.weights", str(weights), "--device", "cpu", "--progress", "false"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, inside", [("--out", "generations"), ("--store_dir", "training")])
def test_output_inside_an_input_folder_is_refused(folders: Path, tmp_path: Path, option: str, inside: str) -> None:
    """An --out (or --store_dir) inside a walked input folder would feed the next scan its own plots
    (20 generations became 22 in the audit): refused with one line, nothing written."""
    import shutil  # only this test copies the folders (a scan on main writes into them)

    shutil.copytree(folders / "gen", tmp_path / "gen")
    shutil.copytree(folders / "train", tmp_path / "train")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    target = tmp_path / ("gen" if inside == "generations" else "train") / "scan"
    extra = ["--out", str(target)] if option == "--out" else ["--out", str(tmp_path / "out"), "--store_dir", str(target)]
    with pytest.raises(UserError, match=rf"^{option} .* lies inside --{inside} "):
        main(["--generations", str(tmp_path / "gen"), "--training", str(tmp_path / "train"), *extra,
              "--device", "cpu", "--progress", "false", "--report_rows", "0"])
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def _outputs(out: Path) -> dict[str, bytes]:
    """The files a scan wrote at the top of ``out`` (not its stores), by name."""
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() or p.name.startswith(".lit-scan-staging")}


def test_outputs_appear_together_or_not_at_all(folders: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The report writer fails after matches.csv, summary.json and the plots were prepared: the folder
    keeps the previous scan's set, byte for byte, and nothing new (no staging folder, no lock)."""
    out = tmp_path / "out"
    args = ["--generations", str(folders / "gen"), "--training", str(folders / "train"), "--out", str(out),
            "--device", "cpu", "--progress", "false", "--report_rows", "2", "--thumb", "16", "--dtype", "float32"]
    main([*args, "--k", "3"])
    before = _outputs(out)
    assert {"matches.csv", "summary.json", "report.html", "similarity_histogram.png"} <= set(before)

    def broken_report(*_: object, **__: object) -> Path:
        raise RuntimeError("the report writer failed")

    monkeypatch.setattr("lit.commands.scan.outputs.write_report", broken_report)
    with pytest.raises(RuntimeError, match="the report writer failed"):
        main([*args, "--k", "2"])  # another k: every file would differ
    assert _outputs(out) == before
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="the report writer failed"):
        main([*args, "--k", "2", "--out", str(fresh), "--store_dir", str(out / "stores")])
    assert sorted(p.name for p in fresh.iterdir()) == [".lit-scan"]  # claimed, nothing written


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(folders: Path, tmp_path: Path) -> None:
    """--out is locked: a lock naming a running process refuses the scan with one line (its lock and
    files untouched); a lock left by a process that is gone is taken over with a warning."""
    import subprocess  # processes to hold and to leave locks
    import sys

    out = tmp_path / "out"
    out.mkdir()
    (out / ".lit-scan").write_text("made by lit scan\n")
    args = ["--generations", str(folders / "gen"), "--training", str(folders / "train"), "--out", str(out),
            "--device", "cpu", "--progress", "false", "--report_rows", "1", "--thumb", "16", "--k", "1"]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lit-scan.lock").write_text(f"{sleeper.pid}\n")
        with pytest.raises(UserError, match=rf"^--out {re.escape(str(out))} is being written by process "
                                            rf"{sleeper.pid} "):
            main(args)
        assert sorted(p.name for p in out.iterdir()) == [".lit-scan", ".lit-scan.lock"]
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.warns(UserWarning, match=rf"taking over the lock .* of process {sleeper.pid}, which is no longer"):
        main(args)
    assert (out / "report.html").is_file() and not (out / ".lit-scan.lock").exists()


def test_matches_csv_is_in_score_order(scanned: Path) -> None:
    """matches.csv: generations by top-1 score, highest first (the copies on top), ranks 1..k in order
    within each generation."""
    with open(scanned / "matches.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    blocks = [rows[i:i + 3] for i in range(0, len(rows), 3)]
    assert all([r["rank"] for r in block] == ["1", "2", "3"] for block in blocks)
    assert all(len({r["generation"] for r in block}) == 1 for block in blocks)
    top1 = [float(block[0]["score"]) for block in blocks]
    assert top1 == sorted(top1, reverse=True)
    assert {block[0]["generation"] for block in blocks[:3]} == {f"gen/copy{i}.png" for i in range(3)}


def test_generation_order_breaks_ties_by_key() -> None:
    from lit.commands.scan.report import generation_order  # new in this change

    ranking = torch.tensor([[0.5, 0.1], [0.9, 0.2], [0.5, 0.4], [0.7, 0.0], [0.5, 0.3]])
    assert generation_order(ranking, ["b", "z", "a", "c", "b0"]) == [1, 3, 2, 0, 4]


def test_thresholds_are_said_to_be_sscds(folders: Path, scanned: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """With a descriptor other than sscd_resnet50 the console, summary.json and report.html say that
    0.5 is SSCD's threshold and to read rates against the baseline; with SSCD's own record, nothing."""
    import html

    from lit.commands.scan.outputs import threshold_note  # new in this change

    out = tmp_path / "out"
    main(["--generations", str(folders / "gen.tsv"), "--training", str(folders / "train"), "--out", str(out),
          "--store_dir", str(scanned / "stores"), "--k", "3", "--dtype", "float32", "--device", "cpu",
          "--report_rows", "1", "--thumb", "16", "--progress", "false"])
    said = "0.5 is SSCD's replication threshold, calibrated for sscd_resnet50; with pixel read each rate against " \
           "the training baseline's column"
    assert said in capsys.readouterr().out
    assert said in json.loads((out / "summary.json").read_text())["threshold_note"]
    assert html.escape(said) in (out / "report.html").read_text()
    sscd = {"name": "sscd_resnet50", "display_name": "sscd_resnet50", "random_init": False}
    assert threshold_note(sscd, (0.5,)) is None
    assert "with sscd_resnet50 (random init) read" in threshold_note(
        {**sscd, "random_init": True, "display_name": "sscd_resnet50 (random init)"}, (0.5,))


def test_random_init_scan_of_a_folder_against_itself_finds_every_image(folders: Path, tmp_path: Path) -> None:
    """Generations and training are embedded through one random network (the seeded one), so every image's
    top-1 is itself at cosine 1.0 (two unseeded networks gave top-1 0.06 here)."""
    out = tmp_path / "out"
    main(["--generations", str(folders / "train"), "--training", str(folders / "train"), "--out", str(out),
          "--descriptor.name", "vit_s16_in1k", "--descriptor.random_init", "true", "--descriptor.input_size", "32",
          "--k", "1", "--dtype", "float32", "--device", "cpu", "--progress", "false", "--thumb", "16",
          "--report_rows", "2"])
    with open(out / "matches.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 24
    assert [float(r["score"]) for r in rows] == pytest.approx([1.0] * 24, abs=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["descriptor"]["random_init"] is True and summary["descriptor"]["seed"] == 0


def _xor_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data)):
        data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["xor", "delete", "truncate", "manifest"])
def test_a_damaged_store_of_the_scan_is_extracted_again_never_reused(
        folders: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    out = tmp_path / "out"
    args = ["--generations", str(folders / "gen"), "--training", str(folders / "train"), "--out", str(out),
            "--k", "2", "--dtype", "float32", "--device", "cpu", "--progress", "false", "--thumb", "16",
            "--report_rows", "2"]
    main(args)
    first = (out / "matches.csv").read_text()
    store = next(p for p in (out / "stores").iterdir() if p.name.startswith("training"))
    shard = min(store.glob("shard-*.npy"))
    if damage == "xor":
        _xor_bytes(shard)
    elif damage == "delete":
        shard.unlink()
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    else:
        (store / "manifest.json").write_text("{garbage")
    capsys.readouterr()
    main(args)
    console = capsys.readouterr().out
    assert f"training: feature store {store} is damaged: " in console and "; extracting it again" in console
    assert "training: reused" not in console and "training: extracted feature store" in console
    assert "generations: reused" in console  # the sound one is still reused
    assert (out / "matches.csv").read_text() == first


def test_a_damaged_store_given_by_the_user_is_one_line(scanned: Path, tmp_path: Path) -> None:
    """A store passed as --training is the user's: never removed, refused in one line naming it."""
    source = next(p for p in (scanned / "stores").iterdir() if p.name.startswith("training"))
    store = tmp_path / "training-store"
    store.mkdir()
    for path in source.iterdir():
        (store / path.name).write_bytes(path.read_bytes())
    _xor_bytes(min(store.glob("shard-*.npy")))
    with pytest.raises(UserError) as raised:
        main(["--generations", str(scanned / "stores" / next(p.name for p in (scanned / "stores").iterdir()
                                                             if p.name.startswith("generations"))),
              "--training", str(store), "--out", str(tmp_path / "out"), "--k", "2", "--device", "cpu",
              "--progress", "false"])
    message = str(raised.value)
    assert "\n" not in message and f"feature store {store} is damaged: shard-" in message
    assert "does not match its checksum" in message and store.is_dir()


# ----------------------------------------------------------------------------- issue 14: stores know their input
# (skipped entries counted with reasons in summary.json; images found from any working directory, and the
# console says how many cannot be found)

_QUICK = ["--descriptor.name", "pixel", "--k", "2", "--device", "cpu", "--batch_size", "8", "--report_rows", "8",
          "--thumb", "16", "--progress", "false"]


def test_dangling_symlinks_and_image_named_folders_are_in_summary_json(folders: Path, tmp_path: Path) -> None:
    gen = tmp_path / "gen"
    shutil.copytree(folders / "gen", gen)
    (gen / "a.png").symlink_to(gen / "missing.png")
    (gen / "b.jpg").mkdir()
    out = tmp_path / "out"
    with pytest.warns(UserWarning):
        main(["--generations", str(gen), "--training", str(folders / "train"), "--out", str(out), *_QUICK])
    summary = json.loads((out / "summary.json").read_text())["generations"]
    assert summary["skipped"] == 3 and summary["skipped_files"] == ["a.png", "b.jpg", "broken.png"]
    assert summary["skipped_reasons"] == [
        {"name": "a.png", "reason": "dangling symlink"},
        {"name": "b.jpg", "reason": "a directory, not an image file"},
        {"name": "broken.png", "reason": "could not be read as an image"}]
    manifest = json.loads(next((out / "stores").glob("generations-*/manifest.json")).read_text())
    assert manifest["num_skipped"] == 3 and [e["name"] for e in manifest["skipped_entries"]] == ["a.png", "b.jpg"]


def test_a_scan_from_another_folder_finds_every_image(folders: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(folders / "gen", tmp_path / "data" / "gen")
    shutil.copytree(folders / "train", tmp_path / "data" / "train")
    monkeypatch.chdir(tmp_path / "data")
    first = tmp_path / "first"
    with pytest.warns(UserWarning):
        main(["--generations", "gen", "--training", "train", "--out", str(first), *_QUICK])  # relative inputs
    stores = {p.name.split("-")[0]: p for p in (first / "stores").iterdir()}
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    second = tmp_path / "second"
    main(["--generations", str(stores["generations"]), "--training", str(stores["training"]), "--out", str(second),
          *_QUICK])
    assert "cannot be found" not in capsys.readouterr().out
    with open(second / "matches.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(Path(r["generation"]).is_file() and Path(r["training"]).is_file() for r in rows)
    assert json.loads((second / "summary.json").read_text())["images_not_found"] == {"generations": 0, "training": 0}
    assert "show a placeholder" not in (second / "report.html").read_text()
    # images moved away after extraction: the console says how many cannot be found
    matched = {Path(r["training"]) for r in rows}
    for path in list(matched)[:2]:
        path.unlink()
    for path in sorted((tmp_path / "data" / "gen").glob("new*.png"))[:3]:
        path.unlink()
    third = tmp_path / "third"
    main(["--generations", str(stores["generations"]), "--training", str(stores["training"]), "--out", str(third),
          *_QUICK])
    assert ("warning: 3 generation and 2 matched training images named in matches.csv cannot be found"
            in capsys.readouterr().out)
    assert json.loads((third / "summary.json").read_text())["images_not_found"] == {"generations": 3, "training": 2}


# ----------------------------------------------------------------------------- a user's files beside what a scan deletes


def test_a_users_files_in_the_scans_out_survive_a_rerun(folders: Path, tmp_path: Path) -> None:
    """A rerun replaces the scan's own outputs, clears its own staging folders and drops only its own
    plot names: a user's files and folders in the same --out (and in its stores folder) are untouched."""
    out = tmp_path / "out"
    args = ["--generations", str(folders / "gen"), "--training", str(folders / "train"), "--out", str(out),
            "--device", "cpu", "--progress", "false", "--report_rows", "2", "--thumb", "16", "--dtype", "float32"]
    main([*args, "--k", "3"])
    mine = {out / "notes.txt": b"my notes", out / "figures" / "similarity_histogram.png": b"my own plot",
            out / "stores" / "README.txt": b"what these stores are"}
    for path, data in mine.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    main([*args, "--k", "2"])
    assert {path: path.read_bytes() for path in mine} == mine
    assert (out / "matches.csv").is_file() and not list(out.glob(".lit-scan-staging*"))


def test_a_damaged_folder_without_the_store_marker_is_refused_not_removed(folders: Path, tmp_path: Path) -> None:
    """A damaged store is extracted again only when it carries the store marker (the suite's own);
    a folder without it, in the place where the scan keeps a store, is refused with one line and kept."""
    out = tmp_path / "out"
    args = ["--generations", str(folders / "gen"), "--training", str(folders / "train"), "--out", str(out),
            "--k", "2", "--dtype", "float32", "--device", "cpu", "--progress", "false", "--report_rows", "0"]
    main(args)
    store = next(p for p in (out / "stores").iterdir() if p.name.startswith("training"))
    (store / ".lit-store.json").unlink()
    (store / "manifest.json").write_text("{garbage")
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    with pytest.raises(UserError) as raised:
        main(args)
    assert "\n" not in str(raised.value) and str(store) in str(raised.value)
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before
