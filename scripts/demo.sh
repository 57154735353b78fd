#!/usr/bin/env bash
# Run the headless ship demo: index sample_data/'s RapidEye clip with the bundled encoder, search
# with a box around one ship, and write output/matches.gpkg and output/matches.png.
# Extra arguments go to tools/run_demo.py (e.g. --overwrite, --k 10, --output-folder DIR).
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The working folder stays the caller's, so that a relative --output-folder is taken from it.
bash "$repo_root/scripts/setup.sh"

export QT_QPA_PLATFORM=offscreen
# Without it Qt warns on every run that it falls back to a folder of its own choice.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/lookalike-runtime-$(id -u)"
  mkdir -p -m 700 "$XDG_RUNTIME_DIR"
fi
exec "$repo_root/.venv/bin/python" "$repo_root/tools/run_demo.py" "$@"
