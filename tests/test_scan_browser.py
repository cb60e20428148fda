"""report.html of ``lit scan`` opened in headless Chromium: every image loads, the page is not blank.

Needs the Debian package ``chromium`` (``.ci/run`` installs it); without a browser
the test is skipped and says so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.procedural import ProceduralScenes
from lit.commands.scan.engine import run_scan
from lit.commands.scan.outputs import prepare_out, write_outputs
from lit.commands.scan.sources import MemorySource
from lit.commands.scan.types import ScanOptions
from lit.grids import save_png

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

#: Added to a copy of the report: on load, record how many <img> decoded (complete, naturalWidth > 0).
CHECKER = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter((im) => im.complete && im.naturalWidth > 0).length;
  document.body.setAttribute("data-images", loaded + "/" + images.length);
  document.body.setAttribute("data-text", String(document.body.innerText.trim().length));
});
</script>"""


def _browser() -> str | None:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def _headless(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
               f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scan of 6 generations (2 copies) against 20 training images, written as files."""
    root = tmp_path_factory.mktemp("browser")
    scenes = ProceduralScenes(20, 24, seed=3)
    images = [scenes[i]["image"] for i in range(20)]
    train_keys = [str(save_png(image, root / "train" / f"t{i}.png")) for i, image in enumerate(images)]
    gen_images = [images[4], images[9].flip(-1)] + [ProceduralScenes(4, 24, seed=4)[i]["image"] for i in range(4)]
    gen_keys = [str(save_png(image, root / "gen" / f"g{i}.png")) for i, image in enumerate(gen_images)]
    features = lambda batch: torch.stack(batch).flatten(1) - 0.5  # noqa: E731 - a stand-in descriptor
    generations = MemorySource("generations", features(gen_images), gen_keys, captions=[f"prompt {i}" for i in range(6)])
    training = MemorySource("training", features(images), train_keys, labels=[f"c{i % 2}" for i in range(20)])
    options = ScanOptions(k=3, progress=False)
    out = root / "out"
    prepare_out(out)
    write_outputs(out, run_scan(generations, training, options), generations, training, options,
                  {"name": "test pixels"}, report_rows=6, thumb=48)
    return out / "report.html"


def test_report_loads_every_image_in_chromium(report: Path, tmp_path: Path) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip("SKIPPED: the chromium browser is missing (apt-get install chromium); "
                    "report.html was not opened in a browser")
    page = tmp_path / "checked.html"
    page.write_text(report.read_text().replace("</body>", CHECKER + "</body>"))
    count = len(re.findall(r"<img ", report.read_text()))
    assert count == 6 * 4 + 3  # generation + 3 matches per row, 3 plots

    dumped = _headless(browser, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom", page.as_uri())
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    images = re.search(r'data-images="(\d+)/(\d+)"', dumped.stdout)
    assert images is not None, "the check script did not run: " + dumped.stdout[:500]
    assert images.groups() == (str(count), str(count)), f"only {images.group(1)} of {count} images loaded"
    text = re.search(r'data-text="(\d+)"', dumped.stdout)
    assert text is not None and int(text.group(1)) > 200

    shot = tmp_path / "shot.png"
    taken = _headless(browser, tmp_path / "profile2", "--window-size=1200,1600", f"--screenshot={shot}",
                      report.as_uri())
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.std() > 10.0, "the screenshot of report.html is blank"
    colourful = np.abs(pixels - pixels.mean(axis=2, keepdims=True)).sum(axis=2) > 30
    assert colourful.mean() > 0.01, "no picture visible in the screenshot"
