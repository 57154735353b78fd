#!/usr/bin/env bash
# Install everything Lookalike needs on Debian 12, as root, and create .venv.
# Idempotent: a second run checks the stamps and returns in seconds.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

debian_packages=(python3-qgis qgis-providers qgis python3-venv python3-dev build-essential)

missing_packages=()
for package in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing_packages+=("$package")
done
if [ "${#missing_packages[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing_packages[*]}"
  sudo_command=()
  [ "$(id -u)" -eq 0 ] || sudo_command=(sudo)
  "${sudo_command[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${sudo_command[@]}" apt-get install -y -q --no-install-recommends "${missing_packages[@]}"
fi

# The venv can import QGIS's Python packages (qgis, numpy, GDAL), so pip only adds what QGIS lacks.
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv on /usr/bin/python3 with the system site packages"
  /usr/bin/python3 -m venv --system-site-packages .venv
fi

# Pin numpy to the version QGIS was built with, so no requirement can replace it.
system_numpy=$(/usr/bin/python3 -c 'import numpy; print(numpy.__version__)')
# Written only when it changes, so that a second run leaves .venv as it is.
if [ "$(cat .venv/constraints.txt 2>/dev/null)" != "numpy==$system_numpy" ]; then
  printf 'numpy==%s\n' "$system_numpy" > .venv/constraints.txt
fi

stamp=.venv/requirements.stamp
wanted=$(cat requirements.txt requirements-dev.txt .venv/constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  echo "setup: installing Python requirements into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check \
    --constraint .venv/constraints.txt -r requirements-dev.txt
  printf '%s\n' "$wanted" > "$stamp"
fi

venv_numpy=$(.venv/bin/python -c 'import numpy; print(numpy.__version__)')
if [ "$venv_numpy" != "$system_numpy" ]; then
  echo "setup: numpy in .venv is $venv_numpy but QGIS was built with $system_numpy; delete .venv and rerun" >&2
  exit 1
fi
