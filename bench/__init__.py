"""Benchmarks of the Lookalike engine; ``bench/run.py`` runs them and writes docs/benchmarks.md.

The folder is importable as ``lookalike.bench`` once ``tools/devimport.import_lookalike()`` has
registered the repository root under the package name. It is not shipped in the plugin zip.
"""
