"""Packaged example configurations."""
