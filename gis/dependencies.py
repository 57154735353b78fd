"""Check for the runtime packages QGIS's Python lacks, and install them without touching numpy.

Packages go into a folder of the user's QGIS profile with ``pip install --target``: that works on
Debian-style "externally managed" system Pythons, needs no administrator rights and leaves
QGIS's own numpy and GDAL in charge, because the folder is appended to ``sys.path``.
"""

import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

from qgis.core import QgsApplication, QgsTask

from ..core import get_logger
from ..core.dependencies import install_command, missing_packages, numpy_constraint

__all__ = ["InstallDependenciesTask", "add_packages_folder_to_path", "missing_packages", "packages_folder"]

LOGGER = get_logger("dependencies")

PACKAGES_FOLDER_NAME = "lookalike_packages"


def packages_folder() -> Path:
    """Return the profile folder that contains the packages the plugin installed."""
    return Path(QgsApplication.qgisSettingsDirPath()) / "python" / PACKAGES_FOLDER_NAME


def add_packages_folder_to_path() -> None:
    """Make packages installed by an earlier session importable, after QGIS's own."""
    folder = str(packages_folder())
    if os.path.isdir(folder) and folder not in sys.path:
        sys.path.append(folder)
        importlib.invalidate_caches()


class InstallDependenciesTask(QgsTask):
    """Background task that runs pip for QGIS's interpreter and keeps the outcome for ``finished``."""

    def __init__(self, import_names: Sequence[str], on_finished=None, python: Optional[str] = None):
        super().__init__("Lookalike: installing Python packages", QgsTask.Flag.CanCancel)
        self.import_names = list(import_names)
        self.on_finished = on_finished
        self.python = python
        self.command: List[str] = []
        self.output = ""
        self.error_message = ""

    def run(self) -> bool:
        target = packages_folder()
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="lookalike-pip-") as temp_folder:
            constraints_file = Path(temp_folder) / "constraints.txt"
            constraints_file.write_text(numpy_constraint() + "\n", encoding="utf-8")
            try:
                self.command = install_command(self.import_names, target, constraints_file, self.python)
            except (FileNotFoundError, ValueError) as error:
                self.error_message = str(error)
                return False
            LOGGER.info("Running: %s", subprocess.list2cmdline(self.command))
            try:
                process = subprocess.Popen(
                    self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
            except OSError as error:
                self.error_message = f"Could not start pip ({error}). Command: {subprocess.list2cmdline(self.command)}"
                return False
            while True:
                try:
                    self.output, _ = process.communicate(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if self.isCanceled():
                        process.kill()
                        process.communicate()
                        self.error_message = "The installation was cancelled."
                        return False
        if process.returncode != 0:
            LOGGER.error("pip failed with exit code %s:\n%s", process.returncode, self.output)
            self.error_message = (
                f"pip exited with code {process.returncode}; its output is in the Lookalike log panel "
                f"(View > Panels > Log Messages). Command: {subprocess.list2cmdline(self.command)}"
            )
            return False
        LOGGER.info("pip finished:\n%s", self.output)
        return True

    def finished(self, result: bool) -> None:
        if result:
            add_packages_folder_to_path()
        if self.on_finished is not None:
            self.on_finished(result, self)
