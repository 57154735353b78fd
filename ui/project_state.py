"""The dock's settings stored in the QGIS project, so reopening a project restores the index.

Entries live under the ``lookalike`` scope of the project file. Paths are stored as QGIS writes
them (relative to the project file when the project uses relative paths), so a project folder
moved together with its index keeps working.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

from qgis.core import QgsProject

from ..core.encoder import MODELS_DIR

SCOPE = "lookalike"


# read_state() returns None for a number the project lacks, so a stored 0 (0 % overlap) stays
# distinct from "not stored".
INT_FIELDS = ("overlap_percent", "k")
FLOAT_FIELDS = ("gsd",)
PATH_FIELDS = ("index_folder", "encoder_path")
# Each path field is also stored as an absolute path, under its key with this suffix.
ABSOLUTE_SUFFIX = "_absolute"


@dataclass
class DockState:
    """Settings the dock restores from a project; GSD in metres per encoder pixel, overlap in percent.

    ``band_indexes`` contains the chosen raster band per encoder input band, comma-separated, or is
    empty for auto. A number is None when the project does not store it.
    """

    index_folder: str = ""
    raster_layer_id: str = ""
    band_indexes: str = ""
    encoder_path: str = ""
    overlap_percent: Optional[int] = None
    gsd: Optional[float] = None
    extent_mode: str = ""
    k: Optional[int] = None


# A bundled encoder is stored by file name under this prefix: a path relative to the project
# file breaks when the project moves to another depth, and the plugin folder differs per machine.
BUNDLED_PREFIX = "bundled:"


def _absolute(project: QgsProject, path: str) -> str:
    if not path:
        return path
    if path.startswith(BUNDLED_PREFIX):
        return str(MODELS_DIR / path[len(BUNDLED_PREFIX):])
    return project.pathResolver().readPath(path)


def _relative(project: QgsProject, path: str) -> str:
    if not path:
        return path
    if Path(path).parent.resolve() == MODELS_DIR.resolve():
        return f"{BUNDLED_PREFIX}{Path(path).name}"
    return project.pathResolver().writePath(path)


def write_state(state: DockState, project: Optional[QgsProject] = None) -> None:
    project = project or QgsProject.instance()
    for field in fields(DockState):
        value = getattr(state, field.name)
        key = f"/{field.name}"
        if field.name in INT_FIELDS + FLOAT_FIELDS and value is None:
            project.removeEntry(SCOPE, key)
        elif field.name in PATH_FIELDS:
            project.writeEntry(SCOPE, key, _relative(project, value))
            # Read back when the relative path does not lead to a file: a file outside a project
            # folder that moved stays where it was.
            project.writeEntry(SCOPE, f"{key}{ABSOLUTE_SUFFIX}", value)
        elif field.name in INT_FIELDS:
            project.writeEntry(SCOPE, key, int(value))
        elif field.name in FLOAT_FIELDS:
            project.writeEntryDouble(SCOPE, key, float(value))
        else:
            project.writeEntry(SCOPE, key, str(value))


def read_state(project: Optional[QgsProject] = None, fallbacks: Optional[list[tuple[str, str]]] = None) -> DockState:
    """Read the stored state; missing entries keep the dataclass defaults.

    Each path taken from its absolute entry, because its relative one leads nowhere, is appended
    to ``fallbacks`` as ``(relative path resolved, absolute path)``.
    """
    project = project or QgsProject.instance()
    defaults = asdict(DockState())
    values = {}
    for field in fields(DockState):
        key = f"/{field.name}"
        if field.name in INT_FIELDS:
            value, found = project.readNumEntry(SCOPE, key, 0)
        elif field.name in FLOAT_FIELDS:
            value, found = project.readDoubleEntry(SCOPE, key, 0.0)
        else:
            value, found = project.readEntry(SCOPE, key, defaults[field.name])
            if found and field.name in PATH_FIELDS:
                value = _absolute(project, value)
                stored_absolute, has_absolute = project.readEntry(SCOPE, f"{key}{ABSOLUTE_SUFFIX}", "")
                if value and not Path(value).exists() and has_absolute and Path(stored_absolute).exists():
                    if fallbacks is not None:
                        fallbacks.append((value, stored_absolute))
                    value = stored_absolute
        values[field.name] = value if found else defaults[field.name]
    return DockState(**values)
