#!/usr/bin/env bash
# Run the benchmarks and regenerate docs/benchmarks.md and docs/img/bench_*.png.
#   bash scripts/bench.sh [--quick|--full] [--only SECTION ...]
# --quick (the default) takes a few minutes; --full is the run the committed page shows.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

bash scripts/setup.sh

# matplotlib draws the plots; numpy stays pinned to QGIS's version by the constraints file.
if ! .venv/bin/python -c "import matplotlib" 2>/dev/null; then
  echo "bench: installing requirements-bench.txt into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check \
    --constraint .venv/constraints.txt -r requirements-bench.txt
fi

exec .venv/bin/python bench/run.py "$@"
