"""Reproducing the paper's comparison: which runs, a results store, and the report.

- :mod:`ssd4rec.reproduce.plan`: per-model settings, availability checks, and running every
  (dataset, model, seed) once (skipping finished runs, resuming unfinished ones, and on
  request continuing runs the time budget stopped);
- :mod:`ssd4rec.reproduce.store`: one JSON record per finished run under ``results/runs/``;
- :mod:`ssd4rec.reproduce.table`: ``results/table.md`` and ``results/table.csv``.

Driven by ``scripts/reproduce.py``.
"""
