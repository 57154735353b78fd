#!/usr/bin/env bash
# Build build/lookalike.zip for QGIS's "Plugins > Install from ZIP".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec /usr/bin/python3 tools/package_plugin.py "$@"
