"""``lit scan`` over a ``lit generate`` folder: prompts, scores and caption sources in matches.csv,
summary.json and report.html, against independent references (numpy features of the pixel
descriptor, scikit-learn's ROC AUC, scipy's Spearman, duplicate counts by construction).

The folder is made by hand here, to the contract of ``lit generate``'s output (images in
``images/``, ``generations.csv``, ``prompts.csv``, ``generate_manifest.json``)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from sklearn.metrics import roc_auc_score

from datamodules.procedural import ProceduralScenes
from lit.commands.scan.analysis import ablation_groups, rank_correlation
from lit.commands.scan.command import main
from lit.commands.scan.generated import MATCH_RULE, match_source_keys
from lit.errors import UserError
from lit.memorization import average_ranks, tpr_at_fpr
from lit.replication import SearchSettings, paired_similarity
from tests.reference_scores import cosine_scores, split_product_scores
from tests.test_scan import _pixel_features, _save
from tests.test_scan_browser import _browser, _headless

SIZE = 32  # the pixel descriptor's input size: no resizing, so the reference is plain numpy
THRESHOLDS = [-1.0, 0.5, 0.9]  # -1: every generation is above (no negatives: AUC n/a)
SCRIPT = "<script>document.title='pwned'</script>"
#: Training images that are copies of each other (by construction): name -> duplicates in the set.
DUPLICATES = {"t00.png": 2, "d0a.png": 2, "d0b.png": 2, "t01.png": 1, "d1a.png": 1}
COLUMNS = ["file", "prompt", "source_key", "seed", "memorization_score", "memorization_score_first",
           "prompt_index", "image_index", "variant"]


#: The generations: (name, what the image is, prompt, source key, score, first-step score, prompt index, variant).
#: "tNN": a copy of that training image; "nK": a new scene K.
GENERATIONS = [
    ("p000_i0", "t02", "a photo of a cat", "t02.png", 30.0, 9.0, 0, ""),  # own source, exact key
    ("p001_i0", "t03", "a photo of a dog", "t03", 25.0, 8.0, 1, ""),  # own source, key without extension
    ("p002_i0", "t00", "a bowl of fruit", "train/t04.png", 20.0, 3.0, 2, ""),  # copy of a triplet; key with a path
    ("p003_i0", "n0", "a boat at sea", "d0a", 5.0, 7.0, 3, ""),  # source with 2 duplicates
    ("p004_i0", "n1", "a red car", "nothere.png", 4.0, 2.0, 4, ""),  # key found nowhere
    ("p005_i0", "n2", "a tree", "t01.png", 3.0, 1.0, 5, ""),  # source with 1 duplicate
    ("p006_i0", "t01", "a mountain", "t06.png", 22.0, 6.0, 6, ""),  # copy of a pair
    ("p007_i0", "t07", f"a {SCRIPT} castle on a hill", "", 28.0, 9.5, 7, "full"),
    ("p008_i0", "n3", "a castle on a hill", "", 6.0, 2.5, 8, "drop 2: <script>"),
    ("p009_i0", "t07", f"a {SCRIPT} castle", "", 26.0, 9.0, 9, "first 3 words"),
    ("p010_i0", "n4", "red barn", "", 2.0, 0.5, 10, "full"),
    ("p010_i1", "t08", "red barn", "", 24.0, 8.5, 10, "full"),
    ("p011_i0", "n5", "barn", "", 1.0, 0.4, 11, "drop 1: red"),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training folder of 13 images (t00..t09, with d0a/d0b copies of t00 and d1a of t01) and a
    lit generate folder of 14 images (13 with a row, one without; near copies of training images
    and new scenes), plus a row naming a missing image and a row that cannot be read."""
    root = tmp_path_factory.mktemp("scan_generations")
    scenes = ProceduralScenes(10, SIZE, seed=21)
    train = {f"t{i:02d}": scenes[i]["image"] for i in range(10)}
    for name, image in {**train, "d0a": train["t00"], "d0b": train["t00"], "d1a": train["t01"]}.items():
        _save(image, root / "train" / f"{name}.png")
    new = ProceduralScenes(7, SIZE, seed=22)
    out = root / "gen"
    rows = []
    noise = torch.Generator().manual_seed(5)
    for number, (name, what, prompt, key, score, first, index, variant) in enumerate(GENERATIONS):
        image = train[what] if what.startswith("t") else new[int(what[1:])]["image"]
        if what.startswith("t"):  # a near copy, each a little noisier: top-1 similarities ~0.99, no ties
            image = (image + 0.004 * (number + 1) * torch.randn(image.shape, generator=noise)).clamp(0, 1)
        _save(image, out / "images" / f"{name}.png")
        rows.append([f"images/{name}.png", prompt, key, 1000 + number, score, first, index,
                     int(name[-1]), variant])
    _save(new[6]["image"], out / "images" / "extra.png")  # an image without a row
    rows.append(["images/gone.png", "a lost prompt", "", 7, 1.5, 1.0, 12, 0, ""])  # a row without an image
    rows.append(["images/bad.png", "a bad row", "", "not a seed", 1.0, 1.0, 13, 0, ""])
    rows.append(["", "a row without a file", "", 8, 1.0, 1.0, 14, 0, ""])
    with open(out / "generations.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    with open(out / "prompts.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt_index", "prompt", "source_key", "variant", "images", "memorization_score",
                         "memorization_score_first"])
        for name, _, prompt, key, score, first, index, variant in GENERATIONS:
            writer.writerow([index, prompt, key, variant, 1, score, first])
    (out / "generate_manifest.json").write_text(json.dumps(
        {"format": "lit-generate/1", "pipeline": {"path": "/models/tiny"}, "scheduler": "DDIM",
         "arguments": {"steps": 4, "guidance": 7.5}, "score_only": False}))
    return root


def _scan(folders: Path, out: Path, generations: str = "gen", *extra: str) -> Path:
    main(["--generations", str(folders / generations), "--training", str(folders / "train"), "--out", str(out),
          "--descriptor.name", "pixel", "--k", "2", "--dtype", "float32", "--device", "cpu", "--batch_size", "16",
          "--report_rows", "14", "--thumb", "24", "--progress", "false", "--thresholds", json.dumps(THRESHOLDS),
          "--store_dir", str(folders / "stores"), *extra])
    return out


@pytest.fixture(scope="module")
def scanned(folders: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _scan(folders, tmp_path_factory.mktemp("scan_generations_out") / "out")


def _matches(out: Path) -> list[dict[str, str]]:
    with open(out / "matches.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _reference(folders: Path) -> dict[str, object]:
    """Brute force: every generation's top-1 training image and similarity, and the training names."""
    train_paths = sorted((folders / "train").glob("*.png"))
    gen_paths = sorted((folders / "gen" / "images").glob("*.png"))
    scores = _pixel_features(gen_paths) @ _pixel_features(train_paths).T
    return {"train": [p.name for p in train_paths], "gens": [f"images/{p.name}" for p in gen_paths],
            "scores": scores, "top1": scores.max(axis=1)}


def test_matches_carry_the_rows_of_generations_csv(folders: Path, scanned: Path) -> None:
    rows = _matches(scanned)
    assert list(rows[0]) == ["generation", "rank", "training", "score", "prompt", "source_key", "seed",
                             "memorization_score", "memorization_score_first", "variant", "source_similarity"]
    assert len(rows) == 14 * 2  # 13 images with a row, one without
    by_file = {r["generation"].split("/gen/")[1]: r for r in rows if r["rank"] == "1"}
    for number, (name, _, prompt, key, score, first, _, variant) in enumerate(GENERATIONS):
        row = by_file[f"images/{name}.png"]
        assert (row["prompt"], row["source_key"], row["seed"], row["variant"]) == (prompt, key, str(1000 + number),
                                                                                    variant)
        assert (float(row["memorization_score"]), float(row["memorization_score_first"])) == (score, first)
    assert all(by_file["images/extra.png"][c] == "" for c in ("prompt", "seed", "memorization_score"))
    # no class label from the images/ folder, and the training set is flat
    assert "generation_label" not in rows[0] and "training_label" not in rows[0]


def test_source_similarity_and_own_source_matches(folders: Path, scanned: Path) -> None:
    ref = _reference(folders)
    train, scores = ref["train"], ref["scores"]
    found = {"t02.png": "t02.png", "t03": "t03.png", "train/t04.png": "t04.png", "d0a": "d0a.png",
             "t01.png": "t01.png", "t06.png": "t06.png"}
    rows = {r["generation"].split("/gen/")[1]: r for r in _matches(scanned) if r["rank"] == "1"}
    expected_similarity = []
    own = 0
    for name, _, _, key, *_ in GENERATIONS:
        g = ref["gens"].index(f"images/{name}.png")
        value = rows[f"images/{name}.png"]["source_similarity"]
        if key in found:
            source = train.index(found[key])
            assert float(value) == pytest.approx(scores[g, source], abs=1e-5)
            expected_similarity.append(scores[g, source])
            own += int(np.argmax(scores[g]) == source)
        else:
            assert value == ""
    summary = json.loads((scanned / "summary.json").read_text())["generated"]
    sources = summary["caption_sources"]
    assert own == 2  # the copies of t02 and t03, named by their own keys
    assert sources["generations"] == 6 and sources["top1_is_source"] == own
    for t in THRESHOLDS:
        assert sources["source_above"][f"{t:g}"] == int(np.sum(np.array(expected_similarity) > t))
    keys = summary["source_keys"]
    assert keys["generations_with_source_key"] == 7 and keys["generations_with_source_found"] == 6
    assert keys["keys_not_found"] == 1 and keys["keys_not_found_listed"] == ["nothere.png"]
    assert keys["rule"] == MATCH_RULE


def test_duplicate_counts_of_sources_and_matches(folders: Path, scanned: Path) -> None:
    ref = _reference(folders)
    train, scores = ref["train"], ref["scores"]
    train_features = _pixel_features(sorted((folders / "train").glob("*.png")))
    self_scores = train_features @ train_features.T
    np.fill_diagonal(self_scores, 0.0)
    hand = [DUPLICATES.get(name, 0) for name in train]
    assert (self_scores > 0.95).sum(axis=1).tolist() == hand  # the construction holds for this descriptor
    duplicates = json.loads((scanned / "summary.json").read_text())["generated"]["source_duplicates"]
    assert duplicates["threshold"] == 0.95
    # caption sources: t02, t03, t04, d0a (2), t01 (1), t06
    assert duplicates["caption_sources"]["count"] == 6
    assert duplicates["caption_sources"]["mean"] == pytest.approx(3 / 6)
    assert duplicates["caption_sources"]["max"] == 2
    matched = [hand[int(np.argmax(row))] for row in scores]  # a tie inside a copy group: same count
    assert duplicates["top_matches"]["count"] == 14
    assert duplicates["top_matches"]["mean"] == pytest.approx(np.mean(matched))
    for t in THRESHOLDS:
        chosen = [m for m, best in zip(matched, ref["top1"]) if best > t]
        assert duplicates["matches_above"][f"{t:g}"]["mean"] == pytest.approx(np.mean(chosen))
        assert duplicates["matches_above"][f"{t:g}"]["count"] == len(chosen)


def test_memorization_auc_equals_scikit_learn(folders: Path, scanned: Path) -> None:
    ref = _reference(folders)
    top1 = np.array([ref["top1"][ref["gens"].index(f"images/{g[0]}.png")] for g in GENERATIONS])
    memorization = json.loads((scanned / "summary.json").read_text())["generated"]["memorization"]
    assert memorization["count"] == len(GENERATIONS)
    for column, key in ((4, "roc"), (5, "roc_first")):
        scores = np.array([g[column] for g in GENERATIONS])
        for entry, t in zip(memorization[key], THRESHOLDS):
            labels = top1 > t
            assert (entry["positives"], entry["negatives"]) == (int(labels.sum()), int((~labels).sum()))
            if labels.all():
                assert entry["auc"] is None and entry["tpr_at_fpr"] is None
            else:
                assert entry["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
                assert entry["tpr_at_fpr"] == tpr_at_fpr(scores, labels, 0.01)
    scores = np.array([g[4] for g in GENERATIONS])
    assert memorization["correlation"]["pearson"] == pytest.approx(stats.pearsonr(scores, top1)[0], abs=1e-6)
    assert memorization["correlation"]["spearman"] == pytest.approx(stats.spearmanr(scores, top1)[0], abs=1e-9)
    report = (scanned / "report.html").read_text()
    assert re.search(r"<td>-1</td><td>13</td><td>0</td><td>n/a</td><td>n/a</td>", report)


def test_counted_problems_are_in_summary_and_on_the_console(folders: Path, scanned: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    summary = json.loads((scanned / "summary.json").read_text())["generated"]
    assert (summary["rows"], summary["joined"], summary["bad_rows"]) == (16, 13, 1)
    assert summary["rows_without_image_listed"] == ["images/gone.png", "(no file name)"]
    assert summary["images_without_row_listed"] == ["images/extra.png"]
    assert summary["bad_rows_listed"][0]["reason"] == "seed 'not a seed' is not an integer"
    assert summary["manifest"]["format"] == "lit-generate/1"
    _scan(folders, scanned)  # again into the same folder: the stores are reused
    out = capsys.readouterr().out
    assert "1 rows could not be read" in out and "2 rows name images that were not scanned" in out
    assert "1 scanned images have no row" in out
    assert "1 of 7 generations name a source key found in no training image" in out
    assert re.search(r"memorization score: ROC AUC n/a, TPR@1%FPR n/a for top-1 above -1 \(13 above, 0 not\)", out)
    assert "caption sources: 2 of 6 generations have their caption-source image as top-1 match" in out


def test_ablation_groups_in_summary_and_report(folders: Path, scanned: Path) -> None:
    ref = _reference(folders)
    top1 = {g: ref["top1"][ref["gens"].index(f"images/{g}.png")] for g, *_ in GENERATIONS}
    groups = json.loads((scanned / "summary.json").read_text())["generated"]["ablations"]
    assert [g["prompt"] for g in groups] == [f"a {SCRIPT} castle on a hill", "red barn"]
    assert [[v["variant"] for v in g["variants"]] for g in groups] == [
        ["full", "drop 2: <script>", "first 3 words"], ["full", "drop 1: red"]]
    barn = groups[1]["variants"][0]
    assert barn["images"] == 2 and barn["memorization_score_mean"] == pytest.approx(13.0)
    assert barn["top1_mean"] == pytest.approx((top1["p010_i0"] + top1["p010_i1"]) / 2, abs=1e-5)
    assert barn["top1_max"] == pytest.approx(max(top1["p010_i0"], top1["p010_i1"]), abs=1e-5)
    assert barn["above"] == 2  # threshold -1
    report = (scanned / "report.html").read_text()
    table = report.split("Prompt ablations")[1]
    assert "<td>drop 2: &lt;script&gt;</td><td>a castle on a hill</td><td>1</td>" in table
    assert table.index("castle on a hill") < table.index("red barn")


def test_ablation_groups_without_a_full_prompt() -> None:
    groups = ablation_groups([5, 3, 4, 3], ["drop 1: a", "first 1 words", "full", "first 1 words"],
                             ["b", "a", "a b", "a"], [0.2, 0.9, 0.5, 0.7], [1.0, 3.0, 2.0, 5.0], 0.6)
    assert [g["prompt"] for g in groups] == [None, "a b"]
    assert groups[0]["variants"][0] == {"prompt_index": 3, "variant": "first 1 words", "prompt": "a", "images": 2,
                                        "top1_mean": pytest.approx(0.8), "top1_max": 0.9, "above": 2,
                                        "threshold": 0.6, "memorization_score_mean": 4.0}
    assert [v["prompt_index"] for v in groups[1]["variants"]] == [4, 5]


def test_report_escapes_the_prompt_and_shows_scores(scanned: Path) -> None:
    report = (scanned / "report.html").read_text()
    assert SCRIPT not in report
    assert html_escaped(SCRIPT) in report
    assert report.count('<div class="meta">') == 14
    assert re.search(r'memorization score <b class="mscore">30</b> \(first step 9\)<br>seed 1000', report)
    assert "no row in generations.csv" in report
    assert 'figure class="source"' in report
    for name in ("memorization_score.png", "caption_sources.png", "source_duplicates.png"):
        assert (scanned / name).stat().st_size > 1000


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&#x27;")


def test_plain_folder_matches_are_unchanged(folders: Path, scanned: Path, tmp_path: Path) -> None:
    """The same images without generations.csv and the manifest: a plain folder scan, whose matches.csv
    is the generate scan's without the added columns (and with the images/ folder as a class label,
    as before); a rerun of the plain scan into the generate scan's folder removes its extra plots."""
    plain = tmp_path / "plain"
    shutil.copytree(folders / "gen" / "images", plain / "images")
    out = _scan(folders, tmp_path / "out", str(plain))
    before = _matches(out)
    assert list(before[0]) == ["generation", "rank", "training", "score", "generation_label"]
    after = _matches(scanned)
    assert len(before) == len(after)
    for old, new in zip(before, after):
        assert old["generation"].split("/plain/")[1] == new["generation"].split("/gen/")[1]
        assert (old["rank"], old["training"], old["score"], old["generation_label"]) == (
            new["rank"], new["training"], new["score"], "images")
    again = tmp_path / "again"
    shutil.copytree(scanned, again, ignore=shutil.ignore_patterns("stores"))
    _scan(folders, again, str(plain))
    assert not (again / "memorization_score.png").exists() and not (again / "caption_sources.png").exists()
    assert "Generations of lit generate" not in (again / "report.html").read_text()


@pytest.mark.parametrize("change, message", [
    (lambda d: (d / "generate_manifest.json").write_text("{"), "not a readable lit generate manifest"),
    (lambda d: (d / "generate_manifest.json").write_text('{"format": "lit-generate/9"}'),
     "format 'lit-generate/9', this lit scan reads 'lit-generate/1'"),
    (lambda d: (d / "generations.csv").write_text("file,prompt,seed\nimages/a.png,x,1\n"),
     "missing columns source_key, memorization_score, memorization_score_first"),
    (lambda d: (d / "generate_manifest.json").write_text('{"format": "lit-generate/1", "score_only": true}'),
     "was written by lit generate --score_only"),
])
def test_a_bad_generate_folder_is_one_line(folders: Path, tmp_path: Path, change, message: str) -> None:
    folder = tmp_path / "gen"
    shutil.copytree(folders / "gen", folder)
    change(folder)
    with pytest.raises(UserError, match=re.escape(message)):
        _scan(folders, tmp_path / "out", str(folder))
    assert not (tmp_path / "out").exists()  # refused before any folder is made


def test_source_key_rule() -> None:
    training = ["class0/t05.png", "class1/t05.png", "00012/000120034.jpg", "a.png", "a.jpg", "b.png", "x/c.png"]
    keys = ["laion/00012/000120034.jpg", "000120034", "class1/t05.png", "t05.png", "a", "a.png", "b.jpg", "c",
            "y/c.png", None, "/data/train/x/c.png"]
    lookup = match_source_keys(keys, training)
    assert lookup.rows.tolist() == [2, 2, 1, -1, -1, 3, -1, 6, -1, -1, 6]
    assert sorted(lookup.ambiguous) == ["a", "t05.png"]
    assert sorted(lookup.not_found) == ["b.jpg", "y/c.png"]
    assert lookup.with_key == 10 and lookup.missing_generations == 4


@pytest.mark.parametrize("shape, mode", [((12,), "token"), ((5, 6), "token"), ((5, 6), "global")])
def test_paired_similarity_is_the_searchs_similarity_of_each_pair(shape: tuple[int, ...], mode: str) -> None:
    """Each query against one named training row (and, mirror-aware, the better of it and its mirror),
    against float64 references; more pairs than one block."""
    generator = torch.Generator().manual_seed(0)
    queries, training, mirrored = (torch.randn(n, *shape, generator=generator) for n in (70, 9, 9))
    query_rows = torch.arange(69, -1, -1)
    training_rows = torch.randint(0, 9, (70,), generator=generator)
    reference = cosine_scores if len(shape) == 1 else lambda q, g: split_product_scores(q, g, mode)
    plain, flipped = reference(queries, training), reference(queries, mirrored)
    q, t = query_rows.numpy(), training_rows.numpy()
    settings = SearchSettings(normalization=mode)
    found = paired_similarity(queries, training, query_rows, training_rows, settings=settings, pairs_per_block=16)
    assert found.dtype == torch.float32 and found.numpy() == pytest.approx(plain[q, t], abs=1e-5)
    aware = paired_similarity(queries, training, query_rows, training_rows, mirrored=mirrored, settings=settings)
    assert aware.numpy() == pytest.approx(np.maximum(plain[q, t], flipped[q, t]), abs=1e-5)


def test_average_ranks_equal_scipy() -> None:
    values = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 0.5, 1.0])
    assert average_ranks(values).tolist() == stats.rankdata(values, method="average").tolist()
    assert average_ranks(np.zeros(0)).size == 0


def test_rank_correlation_equals_scipy_with_ties() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 5, 30).astype(float), rng.normal(size=30)
    assert rank_correlation(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(stats.spearmanr(x, y)[0],
                                                                                       abs=1e-12)


def test_report_shows_prompts_and_scores_in_chromium(scanned: Path, tmp_path: Path) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip("SKIPPED: the chromium browser is missing (apt-get install chromium); "
                    "report.html was not opened in a browser")
    checker = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter((im) => im.complete && im.naturalWidth > 0).length;
  const metas = Array.from(document.querySelectorAll(".meta")).map((m) => m.innerText);
  document.body.setAttribute("data-images", loaded + "/" + images.length);
  document.body.setAttribute("data-title", document.title);
  document.body.setAttribute("data-meta", encodeURIComponent(JSON.stringify(metas)));
});
</script>"""
    page = tmp_path / "checked.html"
    page.write_text((scanned / "report.html").read_text().replace("</body>", checker + "</body>"))
    dumped = _headless(browser, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom", page.as_uri())
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    images = re.search(r'data-images="(\d+)/(\d+)"', dumped.stdout)
    assert images is not None, "the check script did not run: " + dumped.stdout[:500]
    assert images.group(1) == images.group(2) and int(images.group(2)) >= 14 * 3 + 6
    assert re.search(r'data-title="([^"]*)"', dumped.stdout).group(1) == "lit scan report"  # the prompt's script never ran
    metas = json.loads(_unquote(re.search(r'data-meta="([^"]*)"', dumped.stdout).group(1)))
    assert len(metas) == 14
    shown = "\n".join(metas)
    assert f"“a {SCRIPT} castle on a hill”" in shown  # the prompt as text, script tags and all
    assert "memorization score 30 (first step 9)" in shown and "seed 1000" in shown
    shot = tmp_path / "shot.png"
    taken = _headless(browser, tmp_path / "profile2", "--window-size=1200,2400", f"--screenshot={shot}",
                      (scanned / "report.html").as_uri())
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.std() > 10.0, "the screenshot of report.html is blank"


def _unquote(text: str) -> str:
    return unquote(text.replace("&amp;", "&"))
