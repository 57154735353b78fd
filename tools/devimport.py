"""Make the plugin folder importable as the package ``lookalike`` from tests, tools and benches.

The repository root is the plugin folder, and the checkout folder may have any name, so the
package is registered under its plugin name instead of being found through ``sys.path``.
"""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACKAGE_NAME = "lookalike"
REPO_ROOT = Path(__file__).resolve().parent.parent


def import_lookalike() -> ModuleType:
    """Import the repository root as the package ``lookalike`` and return it."""
    if PACKAGE_NAME in sys.modules:
        return sys.modules[PACKAGE_NAME]
    spec = importlib.util.spec_from_file_location(
        PACKAGE_NAME, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE_NAME] = package
    spec.loader.exec_module(package)
    return package
