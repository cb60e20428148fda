"""The scan demo, small: the planted copies are the top rows of matches and of report.html (known answer)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from lit.commands.scan.demo import main
from lit.errors import UserError


def test_planted_copies_top_the_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    figures = main(["--out", str(out), "--training", "150", "--copies", "4", "--new", "10", "--workers", "1",
                    "--progress", "0"])
    with open(out / "data" / "planted.csv", newline="") as handle:
        planted = {row["generation"]: row["source"] for row in csv.DictReader(handle) if row["source"]}
    assert len(planted) == 4 and len(list((out / "data" / "training").glob("*.png"))) == 150
    assert figures["check"]["planted_in_top_rows"] == 4
    assert figures["check"]["matched_to_source"] == 4
    assert figures["check"]["lowest_copy_score"] > figures["check"]["highest_new_score"]
    # report.html lists generations in score order: the first four rows are the planted copies,
    # each followed by its source as the first match
    report = (out / "scan" / "report.html").read_text()
    rows = re.findall(r'<div class="row">(.*?)</div>', report)
    firsts = [re.findall(r'alt="([^"]+)"', row)[:2] for row in rows[:4]]
    assert {gen for gen, _ in firsts} == set(planted)
    assert all(planted[gen] == match for gen, match in firsts)
    assert json.loads((out / "demo.json").read_text())["images"] == 164


def test_demo_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("not the demo's")
    with pytest.raises(UserError, match="not made by the scan demo"):
        main(["--out", str(tmp_path), "--training", "10", "--copies", "1", "--new", "1"])
