"""lit.replication_report: the monitor's CSVs, console table, figure and labels, without a Trainer,
against hand-written expectations (the table is the README's demo table, character for character)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import torch

from lit.plots import save_figure
from lit.replication import (
    Matches,
    ReplicationStats,
    baseline_rows,
    duplicate_comparison,
)
from lit.replication_report import (
    Where,
    baseline_legend,
    baseline_prefix,
    copy_labels,
    duplicate_scalars,
    history_csv,
    scores_csv,
    settings_text,
    summary_figure,
    summary_table,
    training_name,
)

THRESHOLDS = [0.5, 0.8, 0.9, 0.95]

# README.md, "Two commands": what the demo printed (step, epoch, rates at 0.5/0.8/0.9/0.95, top-1 mean, median)
README_ROWS = [
    (0, 0, 0.000, 0.000, 0.000, 0.000, 0.133, 0.134),
    (750, 74, 0.0625, 0.000, 0.000, 0.000, 0.357, 0.360),
    (1500, 149, 0.875, 0.09375, 0.03125, 0.000, 0.620, 0.612),
]
README_LINES = [
    "    step  epoch    rate@0.5    rate@0.8    rate@0.9   rate@0.95   top1_mean top1_median",
    "       0      0       0.000       0.000       0.000       0.000       0.133       0.134",
    "     750     74       0.062       0.000       0.000       0.000       0.357       0.360",
    "    1500    149       0.875       0.094       0.031       0.000       0.620       0.612",
    "baseline              0.312       0.125       0.125       0.000       0.475       0.406   (training images vs each other)",
]


def _history() -> list[dict[str, float]]:
    names = ["rate@0.5", "rate@0.8", "rate@0.9", "rate@0.95", "top1_mean", "top1_median"]
    return [{"step": s, "epoch": e, "num_samples": 32, **dict(zip(names, values)), "top1_p95": 0.9, "top1_max": 0.95,
             "top_match_duplicates_mean": 0.25, "top_match_duplicates_share": 0.125}
            for s, e, *values in README_ROWS]


BASELINE = ReplicationStats(count=16, rates={0.5: 0.3125, 0.8: 0.125, 0.9: 0.125, 0.95: 0.0}, mean=0.475,
                            median=0.406, p95=0.9, max=0.93)


def test_summary_table_is_the_readme_table() -> None:
    duplicates = duplicate_comparison(torch.tensor([0, 2]), torch.tensor([0, 0, 1, 1, 0, 0, 0, 0]))
    text = summary_table(_history(), THRESHOLDS, num_generations=32, num_training=16, descriptor="pixel",
                         match_mirrors=False, baseline=BASELINE, sample=baseline_rows(16, None),
                         duplicates=duplicates, timings={"reference": 1.0, "search": 0.5},
                         where=Where(tensorboard="runs/demo/version_0", history=Path("runs/demo/version_0/h.csv")))
    lines = text.splitlines()
    assert lines[0] == ("Replication over training: 32 generations (fixed seeds) vs 16 training images, pixel "
                        "descriptor, no mirror matching; rate@t = share of generations whose nearest training "
                        "image scores > t")
    assert lines[1:6] == README_LINES
    assert lines[6] == ("duplicates (other training images with similarity > 0.95): 2 of 8 training images have one "
                        "(mean 0.25); the latest top-1 matches have 1.00 on average")
    assert lines[7] == "monitor time: reference 1.0s, search 0.5s (total 1.5s)"
    assert lines[8] == "TensorBoard logs: runs/demo/version_0  (tensorboard --logdir runs/demo)"
    assert lines[9] == "history CSV: runs/demo/version_0/h.csv"
    sampled = summary_table(_history(), THRESHOLDS, num_generations=32, num_training=16, descriptor="pixel",
                            match_mirrors=True, baseline=BASELINE, sample=baseline_rows(16, 5, seed=2))
    assert "pixel descriptor, mirror-aware matching;" in sampled
    assert sampled.splitlines()[-1].endswith(
        "(training images vs each other; sampled: 5 of 16 training images (seed 2))")


def test_history_csv_rows_baseline_and_mirrors_column() -> None:
    text = history_csv(_history(), THRESHOLDS, True, BASELINE, baseline_rows(16, None))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["step", "epoch", "num_samples", "rate@0.5", "rate@0.8", "rate@0.9", "rate@0.95",
                             "top1_mean", "top1_median", "top1_p95", "top1_max", "top_match_duplicates_mean",
                             "top_match_duplicates_share", "match_mirrors"]
    assert [r["step"] for r in rows] == ["0", "750", "1500", "baseline"]
    assert rows[1]["rate@0.5"] == "0.062500" and rows[2]["top_match_duplicates_share"] == "0.125000"
    assert {r["match_mirrors"] for r in rows} == {"1"}
    assert rows[3]["num_samples"] == "16" and rows[3]["rate@0.5"] == "0.312500"
    sampled = history_csv(_history(), THRESHOLDS, False, BASELINE, baseline_rows(16, 5, seed=2))
    last = list(csv.DictReader(io.StringIO(sampled)))[-1]
    assert last["step"] == "baseline (sampled: 5 of 16 training images (seed 2))" and last["match_mirrors"] == "0"


def test_scores_csv_hand_computed() -> None:
    matches = Matches(torch.tensor([[0.9, 0.5], [0.25, float("-inf")]]), torch.tensor([[3, 1], [0, -1]]),
                      torch.tensor([[True, False], [False, False]]))
    assert scores_csv([7, 8], matches).splitlines() == [
        "seed,score_1,score_2,train_index_1,train_index_2,mirrored_1,mirrored_2",
        "7,0.900000,0.500000,3,1,1,0",
        "8,0.250000,-inf,0,-1,0,0",
    ]


def test_labels_say_how_the_baseline_was_taken() -> None:
    exact, sampled = baseline_rows(100, None), baseline_rows(100, 10, seed=4)
    assert baseline_prefix(exact) == "replication_baseline"
    assert baseline_prefix(sampled) == "replication_baseline_sampled"
    assert baseline_legend(exact) == "training vs training"
    assert baseline_legend(sampled) == "training vs training, sampled 10 of 100"
    text = settings_text("pixel", True, sampled, 0.95, 32)
    assert "mirror-aware matching (match_mirrors: true)" in text
    assert "sampled: 10 of 100 training images (seed 4)" in text and "similarity > 0.95" in text
    check, base = duplicate_scalars(duplicate_comparison(torch.tensor([1, 0]), torch.tensor([2, 0, 0, 0])))
    assert check == {"top_match_duplicates_mean": 0.5, "top_match_duplicates_share": 0.5}
    assert base == {"duplicates_mean": 0.5, "duplicates_share": 0.25}


def test_copy_labels_and_training_names() -> None:
    matches = Matches(torch.rand(3, 2), torch.tensor([[1, 0], [2, -1], [0, 1]]),
                      torch.tensor([[False, True], [False, False], [False, False]]))
    labels, match_labels = copy_labels([10, 11, 12], torch.tensor([2, 0]), matches, ["a/x.png", "a/y.png", "2"])
    assert labels == ["seed 12", "seed 10"]
    assert match_labels == [["#0 x.png", "#1 y.png"], ["#1 y.png", "#0 x.png (mirror)"]]
    assert training_name(2, ["a", "b", "2"]) == "train #2"
    assert training_name(5, []) == "train #5" and training_name(-1, []) == "-"


def test_summary_figure_renders(tmp_path: Path) -> None:
    top1, base = torch.rand(20), torch.rand(16)
    generations, matches, scores = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 3, 8, 8), torch.rand(2, 3)
    figure = summary_figure(_history(), THRESHOLDS, top1, base, BASELINE, baseline_rows(16, 8), generations,
                            matches, scores, ["seed 0", "seed 1"], [["a", "b", "c"]] * 2, num_generations=20,
                            descriptor="pixel", match_mirrors=True)
    assert "mirror-aware matching" in figure._suptitle.get_text()
    texts = [t.get_text() for ax in figure.get_axes() if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("training vs training, sampled 8 of 16") for t in texts)
    assert save_figure(figure, tmp_path / "summary.png").stat().st_size > 10_000


def test_history_with_an_older_checkpoint_row() -> None:
    """A resumed run's rows from before duplicates were logged still print and write (blank cells)."""
    old = [{k: v for k, v in row.items() if not k.startswith("top_match")} for row in _history()]
    assert history_csv(old, THRESHOLDS, False).splitlines()[1].endswith(",,,0")
    assert summary_table(old, THRESHOLDS, num_generations=32, num_training=16, descriptor="pixel",
                         match_mirrors=False).splitlines()[2] == README_LINES[1]
    with pytest.raises(KeyError):
        summary_table([{"step": 0, "epoch": 0}], THRESHOLDS, num_generations=1, num_training=2, descriptor="pixel",
                      match_mirrors=False)
