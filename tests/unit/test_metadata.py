"""metadata.txt: the fields QGIS's plugin manager and repository read."""

import configparser
import re

import pytest

REQUIRED_FIELDS = ("name", "qgisMinimumVersion", "description", "about", "version", "author")


@pytest.fixture(scope="module")
def metadata(repo_root):
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # QGIS keys are camelCase
    parser.read(repo_root / "metadata.txt", encoding="utf-8")
    return parser["general"]


def test_metadata_required_fields_present(metadata):
    for field in REQUIRED_FIELDS:
        assert metadata.get(field, "").strip(), f"metadata.txt lacks {field}"


def test_metadata_targets_qgis_3_22_to_4(metadata):
    assert metadata["name"] == "Lookalike"
    assert metadata["qgisMinimumVersion"] == "3.22"
    assert metadata["qgisMaximumVersion"] == "4.99"
    assert metadata["supportsQt6"] == "True"
    assert metadata["hasProcessingProvider"] == "yes"


def test_metadata_version_is_semantic(metadata):
    assert re.fullmatch(r"\d+\.\d+\.\d+", metadata["version"])


def test_metadata_text_is_real(metadata):
    assert len(metadata["description"]) >= 40
    assert len(metadata["about"]) >= 200
    assert "similarity" in metadata["tags"]


def test_metadata_icon_exists(metadata, repo_root):
    assert (repo_root / metadata["icon"]).is_file()


def test_metadata_has_no_placeholder_urls(metadata):
    # Repository, tracker and homepage need a public address; none exists yet.
    for field in ("homepage", "tracker", "repository", "email"):
        assert field not in metadata
