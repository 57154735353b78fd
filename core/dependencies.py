"""Runtime packages that QGIS's Python lacks, and the pip command that installs them.

Kept free of ``qgis`` imports so the unit tests can check the pins against requirements.txt.
"""

import importlib.util
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# Import name -> pinned requirement; kept equal to requirements.txt (a unit test checks this).
RUNTIME_REQUIREMENTS: Dict[str, str] = {
    "onnxruntime": "onnxruntime==1.32.0",
    "hnswlib": "hnswlib==0.8.0",
}

# onnxruntime's own dependencies other than numpy. They are listed because the install runs with
# --no-deps: letting pip resolve dependencies into the target folder would add a second numpy.
SUPPORT_REQUIREMENTS = ("flatbuffers", "packaging", "protobuf")


def requirements_for(import_names: Sequence[str]) -> List[str]:
    """Return the pip requirements that install ``import_names``, with onnxruntime's own dependencies when needed."""
    requirements = [RUNTIME_REQUIREMENTS[name] for name in import_names]
    if "onnxruntime" in import_names:
        requirements.extend(SUPPORT_REQUIREMENTS)
    return requirements


def missing_packages(import_names: Optional[Sequence[str]] = None) -> List[str]:
    """Return the import names among the runtime requirements that cannot be imported."""
    names = list(RUNTIME_REQUIREMENTS) if import_names is None else list(import_names)
    return [name for name in names if importlib.util.find_spec(name) is None]


def qgis_python_executable() -> str:
    """Return the Python interpreter that QGIS embeds, for running pip.

    Inside QGIS ``sys.executable`` is often the QGIS binary itself (Windows, macOS), so the
    interpreter is looked up beside ``sys.exec_prefix`` when the name does not start with "python".
    """
    if Path(sys.executable).name.lower().startswith("python"):
        return sys.executable
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [
        Path(sys.exec_prefix) / "python.exe",
        Path(sys.exec_prefix) / "bin" / f"python{version}",
        Path(sys.exec_prefix) / "bin" / "python3",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"No Python interpreter found next to QGIS (looked for {', '.join(map(str, candidates))}). "
        f"Install {' '.join(RUNTIME_REQUIREMENTS.values())} with the Python that QGIS uses."
    )


def numpy_constraint() -> str:
    """Return a pip constraint line that pins numpy to the version QGIS runs with."""
    import numpy

    return f"numpy=={numpy.__version__}"


def install_command(
    import_names: Sequence[str], target: Path, constraints_file: Path, python: Optional[str] = None
) -> List[str]:
    """Build the pip command that installs the requirements of ``import_names`` into ``target``."""
    unknown = [name for name in import_names if name not in RUNTIME_REQUIREMENTS]
    if unknown:
        raise ValueError(f"Unknown runtime package(s) {unknown}; expected some of {list(RUNTIME_REQUIREMENTS)}.")
    return [
        python or qgis_python_executable(), "-m", "pip", "install",
        "--disable-pip-version-check", "--no-input", "--upgrade",
        "--target", str(target),
        "--constraint", str(constraints_file),
        "--no-deps",
        *requirements_for(import_names),
    ]
