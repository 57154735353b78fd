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
                     "lookalike/core/__init__.py", "lookalike/LICENSE"):
        assert required in names
    for excluded in ("tests/", "bench/", "tools/", "docs/", "scripts/", "__pycache__", ".pyc", ".venv"):
        assert not any(excluded in name for name in names), excluded
