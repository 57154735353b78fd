"""Build ``lookalike.zip`` for QGIS's "Install from ZIP": runtime files only.

Usage: python tools/package_plugin.py [OUTPUT_ZIP]   (default: build/lookalike.zip)
"""

import argparse
import sys
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PLUGIN_FOLDER_NAME = "lookalike"

# Files and folders QGIS needs at run time; tests, benchmarks, tools, docs and sample data stay out.
RUNTIME_FILES = ("metadata.txt", "__init__.py", "plugin.py", "icon.svg", "LICENSE")
RUNTIME_FOLDERS = ("core", "gis", "processing", "ui", "models")
EXCLUDED_SUFFIXES = (".pyc", ".pyo")
EXCLUDED_FOLDER_NAMES = ("__pycache__",)
# Files a checkout gathers beside the runtime files: editor backups, GDAL's .aux.xml sidecars,
# and hidden files and folders (.DS_Store, .ruff_cache, .pytest_cache).
EXCLUDED_NAME_ENDINGS = ("~", ".aux.xml", ".swp", ".orig", ".rej")


def runtime_paths(repo_root: Path = REPO_ROOT) -> list:
    """Return the repository-relative paths that go into the plugin zip, sorted."""
    paths = []
    for name in RUNTIME_FILES:
        path = repo_root / name
        if not path.is_file():
            raise FileNotFoundError(f"Runtime file {path} is missing; the plugin cannot be packaged without it.")
        paths.append(Path(name))
    for folder in RUNTIME_FOLDERS:
        for path in sorted((repo_root / folder).rglob("*")):
            relative = path.relative_to(repo_root)
            if not path.is_file() or path.suffix in EXCLUDED_SUFFIXES or path.name.endswith(EXCLUDED_NAME_ENDINGS):
                continue
            if any(part in EXCLUDED_FOLDER_NAMES or part.startswith(".") for part in relative.parts):
                continue
            paths.append(relative)
    return sorted(paths)


def build_zip(output: Path, repo_root: Path = REPO_ROOT) -> Path:
    """Write the plugin zip with every file under a top-level ``lookalike/`` folder."""
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_suffix(".zip.part")
    with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for relative in runtime_paths(repo_root):
            archive.write(repo_root / relative, f"{PLUGIN_FOLDER_NAME}/{relative.as_posix()}")
    temporary.replace(output)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", type=Path, default=REPO_ROOT / "build" / "lookalike.zip",
                        help="path of the zip to write (default: build/lookalike.zip)")
    arguments = parser.parse_args(argv)
    path = build_zip(arguments.output)
    print(f"Wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
