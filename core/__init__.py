"""Headless similarity-search engine: tile grid, raster reading, encoder, index and search.

Nothing in this package imports ``qgis``: it runs in QGIS, in Processing, in a plain Python
interpreter and in the unit tests alike.
"""

import logging

LOGGER_NAME = "lookalike"


def get_logger(name: str) -> logging.Logger:
    """Return a child of the plugin logger, whatever folder name the plugin is installed under."""
    return logging.getLogger(f"{LOGGER_NAME}.{name}")
