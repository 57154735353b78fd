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

# QGIS 3.22's Python start-up (QgsPythonUtilsImpl) runs "sip.setapi('QVariant', 2)" and the like
# as "<string>", and the sip 6 module of Debian 12 warns that setapi() is deprecated, so without
# this filter every call starts with that DeprecationWarning. It hides that one warning and no other.
export PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore:setapi() is deprecated:DeprecationWarning"

settings_file=$config_folder/profiles/default/QGIS/QGIS3.ini
if ! grep -qx 'lookalike=true' "$settings_file" 2>/dev/null; then
  "$qgis_process_bin" plugins enable lookalike >/dev/null
fi

# qgis_process 3.22 writes the message of an exception raised while an algorithm runs three times
# to stderr: QgsProcessingAlgorithm::run logs it as Critical, the console feedback prints it after
# "ERROR:" and then logs it as Critical again, and qgis_process echoes every Critical log message.
# This filter drops the two bare echoes around an "ERROR:" line, and any line that repeats the line
# before it (in --json mode the two echoes are adjacent). It holds each other line back until the
# next one arrives, so the last line of stderr can appear only when qgis_process exits.
# NOTE: the echoes are matched line by line, so a message of several lines still appears 3 times.
drop_repeated_errors() {
  # Ignore Ctrl+C here: qgis_process handles SIGINT by cancelling and still has to report.
  trap '' INT
  exec awk '
    function flush_held() { if (has_held) { print held; fflush(); has_held = 0 } }
    /^ERROR:\t/ {
      error_text = substr($0, 8)
      if (has_held && held == error_text) { has_held = 0 } else { flush_held() }
      print; fflush()
      last_error = error_text; drop_next_echo = 1
      next
    }
    drop_next_echo && $0 == last_error { drop_next_echo = 0; next }
    { drop_next_echo = 0 }
    has_held && $0 == held { next }
    { flush_held(); held = $0; has_held = 1 }
    END { flush_held() }
  '
}

# stdout goes straight to descriptor 3 (the terminal or the caller's pipe), and only stderr
# passes through the filter. The pipeline waits for the filter, so its last line is written
# before this script returns, and PIPESTATUS keeps qgis_process's exit status.
set +e
{ "$qgis_process_bin" "$@" 2>&1 1>&3 3>&- | drop_repeated_errors >&2; } 3>&1
exit "${PIPESTATUS[0]}"
