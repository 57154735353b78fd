"""Runtime requirements: pins, detection and the pip command that must never touch numpy."""

from pathlib import Path

import numpy
import pytest

from lookalike.core import dependencies


def _pins_in(requirements_file: Path) -> dict:
    pins = {}
    for line in requirements_file.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name = line.split("==", 1)[0]
            pins[name] = line
    return pins


def test_runtime_pins_match_requirements_file(repo_root):
    pins = _pins_in(repo_root / "requirements.txt")
    assert sorted(pins.values()) == sorted(dependencies.RUNTIME_REQUIREMENTS.values())


def test_missing_packages_reports_unknown_module():
    assert dependencies.missing_packages(["numpy", "lookalike_no_such_module"]) == ["lookalike_no_such_module"]


def test_missing_packages_empty_when_installed():
    assert dependencies.missing_packages() == []


def test_install_command_pins_numpy_and_skips_dependencies(tmp_path):
    constraints = tmp_path / "constraints.txt"
    command = dependencies.install_command(["onnxruntime", "hnswlib"], tmp_path / "target", constraints,
                                           python="/usr/bin/python3")
    assert command[:4] == ["/usr/bin/python3", "-m", "pip", "install"]
    assert command[command.index("--target") + 1] == str(tmp_path / "target")
    assert command[command.index("--constraint") + 1] == str(constraints)
    assert "--no-deps" in command
    assert "onnxruntime==1.32.0" in command
    assert "hnswlib==0.8.0" in command
    assert not any(part.startswith("numpy") for part in command)


def test_install_command_adds_onnxruntime_dependencies_only_for_it(tmp_path):
    hnswlib_only = dependencies.install_command(["hnswlib"], tmp_path, tmp_path / "c.txt", python="python3")
    with_onnxruntime = dependencies.install_command(["onnxruntime"], tmp_path, tmp_path / "c.txt", python="python3")

    assert "protobuf" not in hnswlib_only
    assert "protobuf" in with_onnxruntime


def test_numpy_constraint_is_installed_version():
    assert dependencies.numpy_constraint() == f"numpy=={numpy.__version__}"


def test_install_command_rejects_unknown_package(tmp_path):
    with pytest.raises(ValueError, match="torch"):
        dependencies.install_command(["torch"], tmp_path, tmp_path / "c.txt", python="python3")
