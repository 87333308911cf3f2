"""Runtimes: where rounds run (in-process simulator; Flower adapter)."""
