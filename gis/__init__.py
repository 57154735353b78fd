"""Adapters between QGIS and the headless core: layers, CRSs, result layers, logging."""
