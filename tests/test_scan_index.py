"""``lit scan --index``: the approximate generation search over a tiny clustered training store.

With every IVF list probed the shortlist holds the exact top-k, so matches.csv equals the exact
scan's; the index is saved beside the store, reused by the next scan, recorded in summary.json and
the report; token stores and foreign files at the index path get one-line errors.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import yaml

from lit.commands.scan.command import main
from lit.errors import UserError
from lit.store import StoreWriter
from models.descriptor_config import DescriptorConfig

RECORD = DescriptorConfig("pixel").record()
FACTORY = "IVF16,Flat"


@pytest.fixture(autouse=True)
def one_faiss_thread() -> object:
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _store(root: Path, features: np.ndarray) -> Path:
    writer = StoreWriter(root, RECORD, features.shape[1:], dtype="float32", compare=DescriptorConfig.differences)
    writer.write_shard("0", features, [f"{root.name}{i}" for i in range(len(features))], start=0)
    writer.finalize()
    return root


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 training rows in 20 clusters (16-d); 30 generations near training rows or random; token stores (4 x 16)."""
    root = tmp_path_factory.mktemp("scan_index")
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, 16))
    train = centers[rng.integers(0, 20, 400)] + 0.3 * rng.standard_normal((400, 16))
    gen = np.concatenate([train[rng.choice(400, 20, replace=False)] + 0.05 * rng.standard_normal((20, 16)),
                          rng.standard_normal((10, 16))])
    _store(root / "train", train.astype(np.float32))
    _store(root / "gen", gen.astype(np.float32))
    _store(root / "tokens", rng.standard_normal((40, 4, 16)).astype(np.float32))
    _store(root / "gen_tokens", rng.standard_normal((5, 4, 16)).astype(np.float32))
    return root


def _scan(stores: Path, out: Path, *extra: str, training: str = "train", generations: str = "gen") -> Path:
    main(["--generations", str(stores / generations), "--training", str(stores / training), "--out", str(out),
          "--k", "3", "--device", "cpu", "--report_rows", "0", "--baseline_sample", "50", "--random_sample", "20",
          "--progress", "false", *extra])
    return out


def _matches(out: Path) -> list[dict[str, str]]:
    with open(out / "matches.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_index_with_all_lists_equals_exact_and_is_reused(stores: Path, tmp_path: Path) -> None:
    exact = _scan(stores, tmp_path / "exact")
    approx = _scan(stores, tmp_path / "approx", "--index", FACTORY, "--nprobe", "16")
    index_file = stores / f"train.index-{FACTORY.replace(',', '_')}.faiss"
    assert index_file.is_file() and (index_file.parent / (index_file.name + ".json")).is_file()
    ours, theirs = _matches(approx), _matches(exact)
    assert len(ours) == len(theirs) == 30 * 3
    for a, e in zip(ours, theirs):
        assert (a["generation"], a["rank"], a["training"]) == (e["generation"], e["rank"], e["training"])
        assert float(a["score"]) == pytest.approx(float(e["score"]), abs=1e-5)
    search = json.loads((approx / "summary.json").read_text())["search"]
    assert search["method"] == "approximate" and search["factory"] == FACTORY
    assert (search["nprobe"], search["rerank_factor"], search["reused"]) == (16, 10, False)
    assert Path(search["index_path"]) == index_file
    assert json.loads((exact / "summary.json").read_text())["search"] == {"method": "exact"}
    assert "approximate search: faiss IVF16,Flat, nprobe 16" in (approx / "report.html").read_text()
    assert "exact search" in (exact / "report.html").read_text()

    # the same keys from --config: the saved index is reused, not rewritten
    built = index_file.stat().st_mtime_ns
    config = tmp_path / "scan.yaml"
    config.write_text(yaml.safe_dump({"index": FACTORY, "nprobe": 16, "rerank_factor": 4}))
    again = _scan(stores, tmp_path / "again", "--config", str(config))
    search = json.loads((again / "summary.json").read_text())["search"]
    assert (search["reused"], search["rerank_factor"]) == (True, 4)
    assert index_file.stat().st_mtime_ns == built
    assert [(r["training"], r["rank"]) for r in _matches(again)] == [(r["training"], r["rank"]) for r in theirs]

    # another training sample size is another index: rebuilt over ours
    rebuilt = _scan(stores, tmp_path / "rebuilt", "--index", FACTORY, "--index_train_size", "200")
    search = json.loads((rebuilt / "summary.json").read_text())["search"]
    assert (search["reused"], search["train_size"]) == (False, 200)


def test_index_refuses_token_store(stores: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--index IVF16,Flat: .*global features.*tokens") as error:
        _scan(stores, tmp_path / "tokens", "--index", FACTORY, training="tokens",
              generations="gen_tokens")
    assert "\n" not in str(error.value)


def test_index_refuses_foreign_file(stores: Path, tmp_path: Path) -> None:
    foreign = stores / "train.index-IVF8_Flat.faiss"
    foreign.write_bytes(b"someone else's file")
    with pytest.raises(UserError, match="not written by this suite"):
        _scan(stores, tmp_path / "foreign", "--index", "IVF8,Flat")
    assert foreign.read_bytes() == b"someone else's file"


def test_index_option_errors(stores: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--rerank_factor must be >= 1"):
        _scan(stores, tmp_path / "bad", "--index", FACTORY, "--rerank_factor", "0")
    with pytest.raises(UserError, match="faiss cannot build"):
        _scan(stores, tmp_path / "bad2", "--index", "NotAnIndex")
