#!/usr/bin/env bash
# Run the whole test suite: lint, the unit tests without QGIS, then the QGIS tests offscreen.
# Installs what is missing first (scripts/setup.sh), so it works on a fresh Debian 12 machine.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

bash scripts/setup.sh

export QT_QPA_PLATFORM=offscreen
# QGIS tests get a throwaway profile and settings folder, never the user's own.
test_home=$(mktemp -d)
trap 'rm -rf "$test_home"' EXIT
export XDG_RUNTIME_DIR="$test_home/runtime" HOME="$test_home"
mkdir -m 700 "$XDG_RUNTIME_DIR"
export PYTHONDONTWRITEBYTECODE=1
# QGIS layers computing band statistics would otherwise leave .aux.xml files beside the shared
# rasters, which the tests only read.
export GDAL_PAM_ENABLED=NO

echo "== ruff"
.venv/bin/ruff check .

# pytest exits with 5 when it collects no test; set -e turns that into a failure too.
echo "== unit tests (no QGIS)"
.venv/bin/python -m pytest -p no:qgis -p no:cacheprovider tests/unit "$@"

echo "== QGIS tests (offscreen)"
.venv/bin/python -m pytest -p no:cacheprovider tests/qgis "$@"
