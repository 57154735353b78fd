#!/usr/bin/env bash
# Create .venv-export, the virtual environment that exports the bundled encoder with torch.
# Like .venv, it uses QGIS's system packages (numpy, GDAL, Pillow). numpy stays at the system
# version because QGIS was built against it.
#
# torch is pinned to its CPU build (torch==2.13.0+cpu), which PyPI does not carry. Point pip at a
# source of it before running, for example:
#   TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu bash tools/setup_export_env.sh
# or configure pip's find-links with a folder holding the wheel.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

if [ ! -x .venv-export/bin/python ]; then
  echo "setup_export_env: creating .venv-export on /usr/bin/python3 with the system site packages"
  /usr/bin/python3 -m venv --system-site-packages .venv-export
fi

system_numpy=$(/usr/bin/python3 -c 'import numpy; print(numpy.__version__)')
printf 'numpy==%s\n' "$system_numpy" > .venv-export/constraints.txt

index_options=()
if [ -n "${TORCH_CPU_INDEX:-}" ]; then
  index_options=(--extra-index-url "$TORCH_CPU_INDEX")
fi

.venv-export/bin/python -m pip install -q --disable-pip-version-check \
  --constraint .venv-export/constraints.txt "${index_options[@]}" -r requirements-export.txt

export_numpy=$(.venv-export/bin/python -c 'import numpy; print(numpy.__version__)')
if [ "$export_numpy" != "$system_numpy" ]; then
  echo "setup_export_env: numpy in .venv-export is $export_numpy, expected the system's $system_numpy;" \
    "delete .venv-export and rerun" >&2
  exit 1
fi
echo "setup_export_env: ready; run .venv-export/bin/python tools/export_encoder.py"
