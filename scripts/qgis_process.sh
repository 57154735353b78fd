#!/usr/bin/env bash
# Run qgis_process with the Lookalike plugin of this checkout loaded, in a QGIS profile of its own.
#
#   scripts/qgis_process.sh list
#   scripts/qgis_process.sh help lookalike:search
#   scripts/qgis_process.sh run lookalike:buildindex -- INPUT_RASTERS=image.tif OUTPUT=index
#
# Why the Debian wrapper is bypassed: /usr/bin/qgis_process sources /etc/default/qgis, whose
# QGIS_OPTS='--noversioncheck' is meant for the desktop binary, and qgis_process 3.22 stops with
# "Command --noversioncheck not known!". This script calls qgis_process.bin directly.
#
# How the plugin is found: qgis_process 3.22 loads every plugin that is enabled in the profile's
# settings ([PythonPlugins] lookalike=true) and declares hasProcessingProvider=yes in its
# metadata.txt. It looks for plugins in QGIS_PLUGINPATH as well as in the profile, and takes the
# settings root folder from QGIS_CUSTOM_CONFIG_PATH. The plugin folder must be named after the
# package, so a symlink "lookalike" points at this checkout, whatever the checkout is called.
#
# Environment:
#   LOOKALIKE_QGIS_PROCESS_HOME  folder for the symlink and the profile (default: build/qgis_process
#                                in this checkout; the user's own QGIS profile is never touched)
#   QGIS_PROCESS_BIN             the qgis_process binary (default: qgis_process.bin on PATH, then
#                                /usr/bin/qgis_process.bin)
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
home_folder=${LOOKALIKE_QGIS_PROCESS_HOME:-$repo_root/build/qgis_process}
plugins_folder=$home_folder/plugins
config_folder=$home_folder/config
mkdir -p "$plugins_folder" "$config_folder"
ln -sfn "$repo_root" "$plugins_folder/lookalike"

if [ -n "${QGIS_PROCESS_BIN:-}" ]; then
  qgis_process_bin=$QGIS_PROCESS_BIN
elif command -v qgis_process.bin >/dev/null 2>&1; then
  qgis_process_bin=$(command -v qgis_process.bin)
else
  qgis_process_bin=/usr/bin/qgis_process.bin
fi
if [ ! -x "$qgis_process_bin" ]; then
  echo "qgis_process.sh: $qgis_process_bin not found; install the Debian package qgis (or set QGIS_PROCESS_BIN)" >&2
  exit 127
fi

export QGIS_PLUGINPATH=$plugins_folder${QGIS_PLUGINPATH:+:$QGIS_PLUGINPATH}
export QGIS_CUSTOM_CONFIG_PATH=$config_folder
# qgis_process needs no display, but Qt still loads a platform plugin; offscreen needs no X server.
export QT_QPA_PLATFORM=${QT_QPA_PLATFORM:-offscreen}
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  export XDG_RUNTIME_DIR=$home_folder/runtime
  mkdir -p -m 700 "$XDG_RUNTIME_DIR"
fi
# The Debian wrapper adds GRASS's libraries when its plugin is installed; kept for GRASS algorithms.
if [ -d /usr/lib/grass82/lib ]; then
  export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/usr/lib/grass82/lib
fi
# onnxruntime and hnswlib live in .venv for development (scripts/setup.sh). The venv's folder goes
# on PYTHONPATH; it contains no numpy or GDAL, so QGIS's own copies stay in use.
venv_site_packages=("$repo_root"/.venv/lib/python3*/site-packages)
if [ -d "${venv_site_packages[0]}" ]; then
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}${venv_site_packages[0]}
fi

settings_file=$config_folder/profiles/default/QGIS/QGIS3.ini
if ! grep -qx 'lookalike=true' "$settings_file" 2>/dev/null; then
  "$qgis_process_bin" plugins enable lookalike >/dev/null
fi

exec "$qgis_process_bin" "$@"
