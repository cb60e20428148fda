"""Table 1 report: pivot, best-per-column marking, average ranks with ties (hand-computed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from scipy.stats import rankdata

from lit.commands.table1 import average_ranks, build_report, load_runs, main
from lit.errors import UserError


def _write_run(root: Path, descriptor: str, dataset: str, mean_ap: float, recall: float) -> None:
    folder = root / f"{descriptor}_{dataset}" / "version_0"
    folder.mkdir(parents=True)
    payload = {"descriptor": descriptor, "dataset": dataset, "metrics": {"mAP": mean_ap, "recall@1": recall}}
    (folder / "metrics.json").write_text(json.dumps(payload))


def test_average_ranks_match_scipy_with_ties() -> None:
    table = {
        "a": {"x": 0.9, "y": 0.2, "z": 0.5},
        "b": {"x": 0.9, "y": 0.3, "z": 0.1},
        "c": {"x": 0.1, "y": 0.3, "z": 0.7},
    }
    ranks = average_ranks(table)
    rows = ["a", "b", "c"]
    expected = {r: 0.0 for r in rows}
    for column in ["x", "y", "z"]:
        per_column = rankdata([-table[r][column] for r in rows], method="average")
        for r, value in zip(rows, per_column):
            expected[r] += value / 3
    assert ranks == pytest.approx(expected)
    assert ranks["a"] == pytest.approx((1.5 + 3 + 2) / 3)


def test_rank_only_over_available_columns() -> None:
    ranks = average_ranks({"a": {"x": 0.5}, "b": {"x": 0.4, "y": 0.9}})
    assert ranks == {"a": 1.0, "b": 1.5}


def test_report_marks_best_and_writes_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_run(tmp_path / "runs", "sscd", "Segmix", 0.6704, 0.5)
    _write_run(tmp_path / "runs", "pixel", "Segmix", 0.1, 0.05)
    _write_run(tmp_path / "runs", "pixel", "Cutmix", 0.3, 0.2)
    runs = load_runs([tmp_path / "runs"])
    assert len(runs) == 3
    report = build_report(runs, tmp_path / "out", ["recall@1"])
    text = report.read_text()
    assert "**67.04**" in text and "| pixel | **30.00** | 10.00 | 1.50 |" in text
    csv_lines = (tmp_path / "out" / "table1.csv").read_text().splitlines()
    assert csv_lines[0] == "descriptor,Cutmix,Segmix,avg. rank"
    assert csv_lines[1] == "sscd,,67.04,1.00"
    assert (tmp_path / "out" / "table_recall_at_1.csv").exists()
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "out2")])
    assert "avg. rank" in capsys.readouterr().out


def test_bad_inputs_have_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such runs folder"):
        load_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        load_runs([tmp_path / "empty"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{}")
    with pytest.raises(UserError, match="missing"):
        load_runs([tmp_path / "bad"])
    (tmp_path / "bad" / "metrics.json").write_text("{not json")
    with pytest.raises(UserError, match=r"metrics.json is not a lit test metrics.json: invalid JSON"):
        load_runs([tmp_path / "bad"])


def test_repeated_pair_keeps_newest_and_warns(tmp_path: Path) -> None:
    _write_run(tmp_path / "a", "pixel", "Cutmix", 0.1, 0.1)
    _write_run(tmp_path / "b", "pixel", "Cutmix", 0.4, 0.4)
    old, new = tmp_path / "a/pixel_Cutmix/version_0/metrics.json", tmp_path / "b/pixel_Cutmix/version_0/metrics.json"
    os.utime(old, (1_000, 1_000))
    os.utime(new, (2_000, 2_000))
    with pytest.warns(UserWarning, match="replaces .*a/pixel_Cutmix"):
        runs = load_runs([tmp_path / "b", tmp_path / "a"])
    assert [(r.dataset, r.metrics["mAP"]) for r in runs] == [("Cutmix", 0.4)]


def test_segmix_columns_name_their_mask_source(tmp_path: Path) -> None:
    from datamodules.synthetic.segmix import SegmixDataModule

    names = {fmt: SegmixDataModule(str(tmp_path), mask_format=fmt).name for fmt in ("coco", "voc", "folder")}
    assert names == {"coco": "COCO Segmix", "voc": "VOC Segmix", "folder": "Segmix"}


def test_report_names_random_init_runs_and_records_what_was_measured(tmp_path: Path) -> None:
    """A random-init run gets its own row, and the report lists weights file, SHA-256, input size..."""
    from models.descriptor_config import DescriptorConfig, file_sha256

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not really weights")
    real = DescriptorConfig("pixel").record() | {"weights": str(weights), "weights_sha256": file_sha256(weights)}
    runs = {"real": ("pixel", real, 0.5), "random": ("pixel", DescriptorConfig("pixel", random_init=True).record(), 0.1)}
    for folder, (descriptor, record, value) in runs.items():
        (tmp_path / "runs" / folder).mkdir(parents=True)
        payload = {"descriptor": descriptor, "descriptor_config": record, "dataset": "Cutmix", "metrics": {"mAP": value}}
        (tmp_path / "runs" / folder / "metrics.json").write_text(json.dumps(payload))
    loaded = load_runs([tmp_path / "runs"])
    assert sorted(r.descriptor for r in loaded) == ["pixel", "pixel (random init)"]
    text = build_report(loaded, tmp_path / "out", []).read_text()
    assert "| pixel | **50.00** | 1.00 |" in text and "| pixel (random init) | 10.00 | 2.00 |" in text
    assert f"| pixel | Cutmix | pixel | w.pt | {file_sha256(weights)[:12]} | False | 32 | cosine | token |" in text
    assert "| pixel (random init) | Cutmix | pixel | – | – | True |" in text
    assert (tmp_path / "out" / "runs.csv").read_text().splitlines()[0].startswith("run,dataset,descriptor,weights")
