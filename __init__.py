"""Lookalike: visual similarity search over satellite and aerial imagery for QGIS."""


def classFactory(iface):  # noqa: N802 - name fixed by the QGIS plugin interface
    """Create the plugin instance that QGIS loads."""
    # Imported here so that importing the package (for tests, tools and the headless core)
    # never pulls in QGIS or the GUI.
    from .plugin import LookalikePlugin

    return LookalikePlugin(iface)
