"""Enum names that exist under Qt 5 only: metadata.txt declares supportsQt6, so the plugin must not use them.

PyQt6 accepts only scoped enum names (``Qt.DockWidgetArea.RightDockWidgetArea``), QVariant has
no type enum there, and QGIS 4 keeps the Processing enums in ``Qgis``. The values that differ
between QGIS releases come from ``gis/compat.py``, ``processing/compat.py`` and ``ui/compat.py``.
"""

import re

import pytest

PRODUCT_FOLDERS = ("core", "gis", "processing", "ui")
COMPAT_MODULES = {"gis/compat.py", "processing/compat.py", "ui/compat.py"}

QT5_ONLY_PATTERNS = {
    "unscoped message level": r"\bQgis\.(Info|Warning|Critical|Success)\b",
    "QVariant field type": r"\bQVariant\.(Int|Double|String|LongLong|Bool|UInt)\b",
    "unscoped Qt enum": r"\bQt\.(Right|Left|Top|Bottom)DockWidgetArea\b|\bQt\.(Align[A-Z]\w*|UserRole|DisplayRole|"
                        r"LeftButton|RightButton|Horizontal|Vertical|Checked|Unchecked)\b",
    "exec_ call": r"\.exec_\(",
    "Processing source type": r"\bQgsProcessing\.Type[A-Z]\w*",
    "Processing number type": r"\bQgsProcessingParameterNumber\.(Integer|Double)\b",
    "unscoped task flag": r"\bQgsTask\.(CanCancel|Flags\(\))",
}


def product_files(repo_root):
    files = [repo_root / "plugin.py", repo_root / "__init__.py"]
    for folder in PRODUCT_FOLDERS:
        files.extend(sorted((repo_root / folder).rglob("*.py")))
    return [path for path in files if path.relative_to(repo_root).as_posix() not in COMPAT_MODULES]


@pytest.mark.parametrize("kind", sorted(QT5_ONLY_PATTERNS))
def test_no_qt5_only_names(repo_root, kind):
    pattern = re.compile(QT5_ONLY_PATTERNS[kind])
    found = [
        f"{path.relative_to(repo_root)}:{number}: {line.strip()}"
        for path in product_files(repo_root)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if pattern.search(line)
    ]

    assert found == [], f"{kind} breaks under Qt 6:\n" + "\n".join(found)
