"""Dock widget, map tools and results views."""
