"""Reproduce the paper's comparison: every (dataset, model, seed), then the report.

    python scripts/reproduce.py --datasets ml-1m,amazon-beauty,amazon-video-games,kuairand \
        --models SSD4Rec,SASRec,BERT4Rec,GRU4Rec,Caser,Mamba4Rec,TiM4Rec --seeds 2024,2025,2026 \
        [--results results/] [--quick] [--report | --report-only] [--data_path DIR] \
        [--threads N] [--note TEXT] [--continue-budgeted] [--extra --key=value ...]

Each run trains to early stopping on validation NDCG@10 through ``ssd4rec.run.run`` (what
``python main.py`` does) and leaves ``results/runs/<dataset>/<model>/seed<seed>.json``.
Running the command again skips finished runs and resumes unfinished ones from their
``last.pth``; interrupting it (Ctrl-C, a killed job) loses at most the epoch in progress.

- ``--quick``: 2 epochs, the first seed only, recorded apart (``*.quick.json``,
  ``table.quick.md``) so that smoke runs never count as results;
- ``--report``: after the runs, write ``table.md`` and ``table.csv`` into the results folder;
  ``--report-only``: write them without running anything;
- ``--extra --key=value ...``: everything after ``--extra`` goes to every run as an override
  (after the per-model settings), e.g. ``--extra --epochs=1 --gpu_id=1``.
  ``--extra --max_train_seconds=480`` ends each run's training before an epoch that would
  end past 480 s; the run is then tested and recorded as finished, ``stopped_by: time_budget``.
- ``--continue-budgeted``: so that one run can be trained to early stopping over several
  short GPU sessions, runs recorded ``stopped_by: time_budget`` go on from their ``last.pth``
  under this session's budget, and their record is rewritten for the
  whole run (every session's epoch times; ``earlier_segments`` keeps the earlier records'
  epochs, stopped_by, time_budget, device, overrides, note, ...). A run whose ``last.pth`` is
  gone, or asked for with other settings, is left as it is, with a line saying why; the time
  budget, paths, GPU id and the implementation keys ``backend``, ``chunk_size`` and
  ``compile_glue`` (same function, other kernels) may change. Runs that stopped
  early or at max epochs are never touched. Without the flag they are all skipped.

Exit status: 0 when every requested run is finished or was skipped as not available here,
1 when some run failed (its error is in ``seed<seed>.error.json``; rerun to resume it),
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from ssd4rec.errors import SSD4RecError  # noqa: E402
from ssd4rec.reproduce.plan import PAPER_DATASETS, PAPER_MODELS, PAPER_SEEDS, execute  # noqa: E402
from ssd4rec.reproduce.store import ResultStore  # noqa: E402
from ssd4rec.reproduce.table import write_report  # noqa: E402


def _csv(text):
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv):
    if "--extra" in argv:
        i = argv.index("--extra")
        argv, extra = argv[:i], argv[i + 1:]
    else:
        extra = []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", type=_csv, default=list(PAPER_DATASETS))
    p.add_argument("--models", type=_csv, default=list(PAPER_MODELS))
    p.add_argument("--seeds", type=lambda s: [int(x) for x in _csv(s)], default=list(PAPER_SEEDS))
    p.add_argument("--results", default=str(REPO_ROOT / "results"))
    p.add_argument("--quick", action="store_true", help="2 epochs, first seed, recorded apart")
    p.add_argument("--report", action="store_true", help="write the report after the runs")
    p.add_argument("--report-only", action="store_true", help="write the report, run nothing")
    p.add_argument("--data_path", default=None, help="folder holding <dataset>/<dataset>.inter")
    p.add_argument("--note", default=None,
                   help="free text kept in every new record and shown in the report, e.g. "
                        "'GPU shared by 5 runs' (it explains a time per epoch)")
    p.add_argument("--continue-budgeted", action="store_true",
                   help="go on training runs the time budget stopped, from their last.pth "
                        "(one run over several short GPU sessions)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch's default if not given); on a shared CPU "
                        "fewer threads than cores can be many times faster")
    args = p.parse_args(argv)
    from ssd4rec.config import parse_overrides

    try:
        args.extra = parse_overrides(extra)
    except SSD4RecError as err:
        p.error(str(err))
    if args.quick:
        args.seeds = args.seeds[:1]
    return args


def run_in_process(argv):
    """ssd4rec.run.run with RecBole's logging set up afresh for every run: its init_logger
    uses logging.basicConfig, which does nothing once the root logger has handlers, so
    every later run would otherwise log into the first run's file."""
    from ssd4rec.run import run

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    return run(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    store = ResultStore(args.results, variant="quick" if args.quick else "")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    status = 0
    if not args.report_only:
        summary = execute(args.datasets, args.models, args.seeds, store, run_in_process,
                          quick=args.quick, data_path=args.data_path, extra=args.extra,
                          note=args.note, continue_budgeted=args.continue_budgeted)
        print(f"\n{len(summary['ran'])} run(s) finished now, {len(summary['done'])} already "
              f"finished, {len(summary['skipped'])} skipped, {len(summary['failed'])} failed")
        for what, why in summary["skipped"]:
            print(f"  skipped {what}: {why}")
        for task, error in summary["failed"]:
            print(f"  FAILED {task.dataset} {task.model} seed {task.seed}: {error.splitlines()[-1]}")
        status = 1 if summary["failed"] else 0
    if args.report or args.report_only:
        if args.report_only:  # say "data not available here" for datasets never tried
            from ssd4rec.reproduce.plan import check_dataset

            for dataset in args.datasets:
                if not any(True for r in store.iter_runs() if r["dataset"] == dataset):
                    error = check_dataset(dataset, args.data_path, args.extra)
                    if error is not None:
                        store.mark_dataset_unavailable(dataset, error)
        md = write_report(store, args.datasets, args.models)
        md_path, csv_path = store.table_paths()
        print(f"\n{md}\nwrote {md_path} and {csv_path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
