"""The results store: one JSON file per finished run, checkpoints beside it.

Layout under the results folder (``results/`` by default):

    runs/<dataset>/<model>/seed<seed>.json        a finished run (metrics, epochs, timing, ...)
    runs/<dataset>/<model>/seed<seed>/            its run directory: best.pth, last.pth
    runs/<dataset>/<model>/seed<seed>.error.json  the last failure of an unfinished run
    runs/<dataset>/<model>/unavailable.json       the framework does not know the model
    runs/<dataset>/unavailable.json               the dataset's data is missing here
    table.md, table.csv                           the report

``--quick`` smoke runs use the same layout with ``.quick`` before each suffix
(``seed2024.quick.json``, ``seed2024.quick/``, ``table.quick.md``) so that they never count
as, or block, real runs.

Every JSON file is written to a temporary file in the same folder and renamed, so a crash
never leaves half a record: a record that exists is complete.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator, Optional

RUNS = "runs"
UNAVAILABLE = "unavailable"


def atomic_write_json(path, obj) -> None:
    """json.dump through ``<path>.tmp`` in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path) -> Optional[dict]:
    """The record at path, or None if there is none (or it is not a JSON object)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


class ResultStore:
    """Paths and records of a results folder; ``variant`` is "" or "quick"."""

    def __init__(self, root, variant: str = ""):
        self.root = Path(root)
        self.variant = variant
        self._sfx = f".{variant}" if variant else ""
        self._run_file = re.compile(r"^seed(-?\d+)" + re.escape(self._sfx) + r"\.json$")

    # ---- paths --------------------------------------------------------------------------
    def model_dir(self, dataset: str, model: str) -> Path:
        return self.root / RUNS / dataset / model

    def run_path(self, dataset: str, model: str, seed: int) -> Path:
        return self.model_dir(dataset, model) / f"seed{seed}{self._sfx}.json"

    def run_dir(self, dataset: str, model: str, seed: int) -> Path:
        """Where the run's best.pth and last.pth live."""
        return self.model_dir(dataset, model) / f"seed{seed}{self._sfx}"

    def error_path(self, dataset: str, model: str, seed: int) -> Path:
        return self.model_dir(dataset, model) / f"seed{seed}{self._sfx}.error.json"

    def table_paths(self) -> tuple[Path, Path]:
        return self.root / f"table{self._sfx}.md", self.root / f"table{self._sfx}.csv"

    # ---- finished runs --------------------------------------------------------------------
    def load_run(self, dataset: str, model: str, seed: int) -> Optional[dict]:
        return read_json(self.run_path(dataset, model, seed))

    def save_run(self, record: dict) -> Path:
        path = self.run_path(record["dataset"], record["model"], record["seed"])
        atomic_write_json(path, record)
        error = self.error_path(record["dataset"], record["model"], record["seed"])
        if error.exists():
            error.unlink()
        return path

    def iter_runs(self) -> Iterator[dict]:
        """Every finished run of this variant, sorted by dataset, model, seed."""
        runs = self.root / RUNS
        if not runs.is_dir():
            return
        for dataset_dir in sorted(p for p in runs.iterdir() if p.is_dir()):
            for model_dir in sorted(p for p in dataset_dir.iterdir() if p.is_dir()):
                files = []
                for f in model_dir.iterdir():
                    m = self._run_file.match(f.name)
                    if m and f.is_file():
                        files.append((int(m.group(1)), f))
                for _, f in sorted(files):
                    record = read_json(f)
                    if record is not None:
                        yield record

    # ---- failures and things that cannot run here -------------------------------------
    def record_error(self, dataset: str, model: str, seed: int, error: str) -> None:
        atomic_write_json(self.error_path(dataset, model, seed),
                          {"dataset": dataset, "model": model, "seed": seed, "error": error})

    def mark_dataset_unavailable(self, dataset: str, error: str) -> None:
        atomic_write_json(self.root / RUNS / dataset / f"{UNAVAILABLE}.json",
                          {"dataset": dataset, "status": "data not available here", "error": error})

    def clear_dataset_unavailable(self, dataset: str) -> None:
        path = self.root / RUNS / dataset / f"{UNAVAILABLE}.json"
        if path.exists():
            path.unlink()

    def mark_model_unavailable(self, dataset: str, model: str, error: str) -> None:
        atomic_write_json(self.model_dir(dataset, model) / f"{UNAVAILABLE}.json",
                          {"dataset": dataset, "model": model,
                           "status": "model not available here", "error": error})

    def clear_model_unavailable(self, dataset: str, model: str) -> None:
        path = self.model_dir(dataset, model) / f"{UNAVAILABLE}.json"
        if path.exists():
            path.unlink()

    def unavailable_datasets(self) -> dict[str, dict]:
        runs = self.root / RUNS
        out = {}
        if runs.is_dir():
            for d in sorted(p for p in runs.iterdir() if p.is_dir()):
                record = read_json(d / f"{UNAVAILABLE}.json")
                if record is not None:
                    out[d.name] = record
        return out

    def unavailable_models(self) -> dict[tuple[str, str], dict]:
        runs = self.root / RUNS
        out = {}
        if runs.is_dir():
            for d in sorted(p for p in runs.iterdir() if p.is_dir()):
                for m in sorted(p for p in d.iterdir() if p.is_dir()):
                    record = read_json(m / f"{UNAVAILABLE}.json")
                    if record is not None:
                        out[(d.name, m.name)] = record
        return out
