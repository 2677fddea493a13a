"""Seeing a run: next-patch prediction grids, greedy captions, curves and reports."""
