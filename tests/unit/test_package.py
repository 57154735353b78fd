"""The plugin zip contains the runtime files under lookalike/ and nothing for development."""

import sys
import zipfile


def test_zip_has_runtime_files_only(repo_root, tmp_path):
    sys.path.insert(0, str(repo_root / "tools"))
    import package_plugin

    zip_path = package_plugin.build_zip(tmp_path / "lookalike.zip", repo_root)
    names = zipfile.ZipFile(zip_path).namelist()

    assert all(name.startswith("lookalike/") for name in names)
    for required in ("lookalike/metadata.txt", "lookalike/__init__.py", "lookalike/plugin.py",
                     "lookalike/core/__init__.py", "lookalike/LICENSE", "lookalike/models/LICENSE-weights.txt"):
        assert required in names
    for excluded in ("tests/", "bench/", "tools/", "docs/", "scripts/", "__pycache__", ".pyc", ".venv"):
        assert not any(excluded in name for name in names), excluded


def test_zip_leaves_out_checkout_clutter(repo_root, tmp_path):
    # A copy of the runtime files with what an editor, macOS, ruff and GDAL leave in a checkout.
    import shutil

    sys.path.insert(0, str(repo_root / "tools"))
    import package_plugin

    copy = tmp_path / "checkout"
    for name in package_plugin.RUNTIME_FILES:
        copy.mkdir(exist_ok=True)
        shutil.copy(repo_root / name, copy / name)
    for folder in package_plugin.RUNTIME_FOLDERS:
        shutil.copytree(repo_root / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    clutter = ["core/.DS_Store", "core/.ruff_cache/cache", "models/model.onnx.aux.xml", "ui/scratch.py~",
               "gis/.plugin.py.swp"]
    for name in clutter:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_text("clutter", encoding="utf-8")

    names = zipfile.ZipFile(package_plugin.build_zip(tmp_path / "lookalike.zip", copy)).namelist()

    for name in clutter:
        assert f"lookalike/{name}" not in names
    assert "lookalike/core/__init__.py" in names
