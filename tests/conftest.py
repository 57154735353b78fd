"""Shared fixtures: the plugin package under its own name and the paths of the test data."""

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# "python -m pytest" puts the working folder first on sys.path; from the repository root that would
# make "import processing" find the plugin's subpackage instead of QGIS's Processing framework.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != REPO_ROOT]
sys.path.insert(0, str(REPO_ROOT / "tools"))
# The dock tests share fixtures and helpers through tests/qgis/dock_testing.py.
sys.path.insert(0, str(REPO_ROOT / "tests" / "qgis"))

from devimport import import_lookalike  # noqa: E402

import_lookalike()

# Real imagery shared beside the checkout; research-only files are read from here, never copied.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Return the shared real-imagery folder, skipping the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
