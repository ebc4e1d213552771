"""Checks of the repository as a whole: the import graph, the backend seam, the one error
root, reproducible fixture guests, text safety, and the benchmarks' smoke runs."""
