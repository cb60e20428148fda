"""Test-wide settings and the photo fixtures.

One intra-op thread: the tests use tiny tensors, for which two contending threads on a
2-core machine are 10-40x slower than one (measured on test_procedural).

Photographs with object masks (``tests/photo_fixtures.py``): ``procedural_photos`` is
written once per session into a temporary folder; ``bsds300`` is the real BSDS300 photos
that CI keeps beside the repository. A test that takes ``bsds300``, or ``photos`` (both
sets, one test each), or carries ``@pytest.mark.real_photos`` is skipped with one line when
they are absent (a user's clone), and runs where they are.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from photo_fixtures import PhotoSet, write_photo_set  # noqa: E402

torch.set_num_threads(1)

BSDS300 = PhotoSet(
    "bsds300", Path(__file__).resolve().parents[2] / "shared" / "data" / "bsds300", {"train": 200, "val": 100},
    ("101085", "102061", "103070", "105025", "106024", "108005", "108070", "108082"),
)
NO_REAL_PHOTOS = "real photos absent: no ../shared/data/bsds300 beside the repository (CI has them)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that reads the real photos; skip them all when they are absent."""
    absent = not BSDS300.root.is_dir()
    for item in items:
        if "bsds300" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_photos)
        if absent and item.get_closest_marker("real_photos"):
            item.add_marker(pytest.mark.skip(reason=NO_REAL_PHOTOS))


@pytest.fixture(scope="session")
def procedural_photos(tmp_path_factory: pytest.TempPathFactory) -> PhotoSet:
    """Procedural photographs with masks in the BSDS300 layout, written once per session."""
    return write_photo_set(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def bsds300() -> PhotoSet:
    """The real BSDS300 photos (200 train, 100 val, masks in VOC and COCO form)."""
    return BSDS300


@pytest.fixture(scope="session", params=["procedural", pytest.param("bsds300", marks=pytest.mark.real_photos)])
def photos(request: pytest.FixtureRequest) -> PhotoSet:
    """Each photo set in turn: the procedural one always, the real one where it exists."""
    return request.getfixturevalue("procedural_photos" if request.param == "procedural" else "bsds300")
