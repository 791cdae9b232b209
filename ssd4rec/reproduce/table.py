"""The report: per dataset and model, mean ± std over seeds of the test metrics.

``results/table.md`` (for reading) and ``results/table.csv`` (for plotting), both built from
the run records of a :class:`~ssd4rec.reproduce.store.ResultStore`:

- one table per dataset: NDCG, MRR and HR at 10 and 20, mean ± sample standard deviation
  over seeds (the mean alone for one seed), the best model of each column in bold, and a
  last row with SSD4Rec's relative gain over the best baseline of that column;
- a dataset whose data is missing here shows "data not available here" and the reason;
  models that cannot run (unknown to the framework) or have no finished run are listed;
- every run: epochs, best epoch, why training stopped (early stopping, the time budget
  ``max_train_seconds``, or max epochs), seconds per epoch, hardware, kernels used; models
  with a run that did not train to early stopping are marked in the dataset's table;
- the per-model settings (MODEL_SETTINGS).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Iterable, Optional

from ssd4rec.reproduce.plan import IMPLEMENTATION_KEYS, MODEL_SETTINGS, OURS, SETTINGS_SOURCES
from ssd4rec.reproduce.store import ResultStore

# (RecBole result key, column title)
METRICS = (
    ("ndcg@10", "NDCG@10"), ("mrr@10", "MRR@10"), ("hit@10", "HR@10"),
    ("ndcg@20", "NDCG@20"), ("mrr@20", "MRR@20"), ("hit@20", "HR@20"),
)
DIGITS = 4
GAIN_LABEL = f"{OURS} gain over best baseline"
NOT_AVAILABLE = "data not available here"


def mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (n - 1); std is None for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def aggregate(records: Iterable[dict]) -> dict[tuple[str, str], dict]:
    """{(dataset, model): {"seeds": [...], key: (mean, std) for each metric present}}."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["model"]), []).append(r)
    out = {}
    for key, runs in groups.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        cell = {"seeds": [r["seed"] for r in runs]}
        for metric, _ in METRICS:
            values = [float(r["test"][metric]) for r in runs if metric in r.get("test", {})]
            if values:
                cell[metric] = mean_std(values)
        out[key] = cell
    return out


def gains(cells: dict[str, dict]) -> dict[str, Optional[float]]:
    """Per metric: 100 * (ours - best baseline) / best baseline, from the means; None when
    either side is missing (or the best baseline is 0)."""
    out = {}
    for metric, _ in METRICS:
        ours = cells.get(OURS, {}).get(metric)
        base = [c[metric][0] for m, c in cells.items() if m != OURS and metric in c]
        if ours is None or not base or max(base) == 0:
            out[metric] = None
        else:
            out[metric] = 100.0 * (ours[0] - max(base)) / max(base)
    return out


def _fmt(ms: tuple[float, Optional[float]]) -> str:
    mean, std = ms
    return f"{mean:.{DIGITS}f}" if std is None else f"{mean:.{DIGITS}f} ± {std:.{DIGITS}f}"


def _fmt_gain(g: Optional[float]) -> str:
    return "–" if g is None else f"{g:+.2f}%"


STOP_TEXT = {"early_stopping": "early stopping", "epochs": "max epochs", "time_budget": "time budget"}
CUT_SHORT = ("time_budget", "epochs")  # training ended before early stopping
CUT_SHORT_MARK = "†"


def stopped_by_text(record: dict) -> str:
    """Why a run's training ended, for the Runs table ("–" for records older than the field)."""
    reason = record.get("stopped_by")
    if not reason:
        return "–"
    text = STOP_TEXT.get(reason, str(reason))
    budget = record.get("time_budget") or {}
    if reason == "time_budget":
        parts = []
        if budget.get("elapsed_s") is not None and budget.get("max_train_seconds") is not None:
            parts.append(f"{float(budget['elapsed_s']):.0f} s of {float(budget['max_train_seconds']):g} s")
        if budget.get("after_epoch") is not None:
            parts.append(f"after epoch {budget['after_epoch']}")
        text = f"**{text}**" + (f" ({', '.join(parts)})" if parts else "")
    return text


def _cut_short(records: Iterable[dict]) -> dict[tuple[str, str], list[str]]:
    """{(dataset, model): ["seed 2024: time budget", ...]} for runs not trained to early stopping."""
    out: dict[tuple[str, str], list[str]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        if r.get("stopped_by") in CUT_SHORT:
            out.setdefault((r["dataset"], r["model"]), []).append(
                f"seed {r['seed']}: {STOP_TEXT[r['stopped_by']]}")
    return out


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def _settings_text(model: str) -> str:
    s = MODEL_SETTINGS.get(model)
    if s is None:
        return "(no entry: config.yaml + dataset YAML)"
    if not s:
        return "config.yaml + datasets/<dataset>.yaml"
    return ", ".join(f"{k}={v}" for k, v in s.items())


def build_report(records: list[dict], datasets: list[str], models: list[str],
                 unavailable_datasets: dict[str, dict], unavailable_models: dict[tuple[str, str], dict],
                 title: str = "SSD4Rec reproduction") -> tuple[str, str]:
    """(markdown, csv) for the given datasets and models, in that order."""
    stats = aggregate(records)
    cut_short = _cut_short(records)
    titles = [t for _, t in METRICS]
    md = [f"# {title}", "",
          "Test metrics (leave-one-out by time, full ranking over all items), mean ± sample "
          "standard deviation over seeds (the mean alone for one seed). **Bold**: best model "
          f"of the column. Last row: {OURS}'s relative gain over the best baseline of the column.",
          ""]
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["dataset", "model", "status", "seeds"]
                    + [f"{k}_{s}" for k, _ in METRICS for s in ("mean", "std")] + ["note"])

    for dataset in datasets:
        md += [f"## {dataset}", ""]
        if dataset in unavailable_datasets:
            reason = _first_line(unavailable_datasets[dataset].get("error", ""))
            md += [f"{NOT_AVAILABLE}: {reason}", ""]
            writer.writerow([dataset, "", NOT_AVAILABLE, 0] + [""] * (2 * len(METRICS)) + [reason])
            continue
        cells = {m: stats[(dataset, m)] for m in models if (dataset, m) in stats}
        if not cells:
            md += ["no finished runs yet", ""]
        else:
            best = {}
            for metric, _ in METRICS:
                means = [round(c[metric][0], DIGITS) for c in cells.values() if metric in c]
                best[metric] = max(means) if means else None
            md += ["| Model | Seeds | " + " | ".join(titles) + " |",
                   "|---|---:|" + "---:|" * len(titles)]
            for model, cell in cells.items():
                parts = []
                for metric, _ in METRICS:
                    if metric not in cell:
                        parts.append("–")
                        continue
                    text = _fmt(cell[metric])
                    if round(cell[metric][0], DIGITS) == best[metric]:
                        text = f"**{text}**"
                    parts.append(text)
                short = cut_short.get((dataset, model))
                label = f"{model} {CUT_SHORT_MARK}" if short else model
                md.append(f"| {label} | {len(cell['seeds'])} | " + " | ".join(parts) + " |")
                flat = []
                for metric, _ in METRICS:
                    mean, std = cell.get(metric, (None, None))
                    flat += ["" if mean is None else f"{mean:.6f}", "" if std is None else f"{std:.6f}"]
                csv_note = "not trained to early stopping: " + "; ".join(short) if short else ""
                writer.writerow([dataset, model, "finished", len(cell["seeds"])] + flat + [csv_note])
            g = gains(cells)
            md.append(f"| {GAIN_LABEL} | | " + " | ".join(_fmt_gain(g[m]) for m, _ in METRICS) + " |")
            writer.writerow([dataset, GAIN_LABEL, "gain_percent", ""]
                            + [x for m, _ in METRICS for x in ("" if g[m] is None else f"{g[m]:.6f}", "")]
                            + [""])
            md.append("")
            marked = [(m, cut_short[(dataset, m)]) for m in cells if (dataset, m) in cut_short]
            if marked:
                md += [f"{CUT_SHORT_MARK} Not trained to early stopping (stopped by the time budget "
                       "max_train_seconds, or at max epochs): "
                       + "; ".join(f"{m} {', '.join(why)}" for m, why in marked) + ".", ""]
        missing = []
        for model in models:
            if (dataset, model) in unavailable_models:
                reason = _first_line(unavailable_models[(dataset, model)].get("error", ""))
                missing.append(f"- {model}: model not available here ({reason})")
                writer.writerow([dataset, model, "model not available here", 0]
                                + [""] * (2 * len(METRICS)) + [reason])
            elif (dataset, model) not in stats:
                missing.append(f"- {model}: no finished run yet")
                writer.writerow([dataset, model, "no finished run", 0] + [""] * (2 * len(METRICS)) + [""])
        if missing:
            md += ["Not in the table:", ""] + missing + [""]

    md += ["## Runs", "",
           "| Dataset | Model | Seed | Epochs | Best epoch | Stopped by | s / epoch | Device | Kernels | Note |",
           "|---|---|---:|---:|---:|---|---:|---|---|---|"]
    for r in sorted(records, key=lambda r: (datasets.index(r["dataset"]) if r["dataset"] in datasets else 1e9,
                                            models.index(r["model"]) if r["model"] in models else 1e9,
                                            r["seed"])):
        spe = r.get("seconds_per_epoch")
        kernels = _kernels_text(r)
        note = []
        if r.get("resumed_from_epoch") is not None:
            note.append(f"resumed at epoch {r['resumed_from_epoch'] + 1}")
        if r.get("earlier_segments"):  # continued after the time budget stopped it
            note.append(f"trained over {len(r['earlier_segments']) + 1} sessions")
        if r.get("evaluated_only"):
            note.append("test evaluation finished after a restart")
        if r.get("quick"):
            note.append("quick")
        if r.get("note"):
            note.append(r["note"])
        md.append(f"| {r['dataset']} | {r['model']} | {r['seed']} | {r.get('epochs', '–')} | "
                  f"{r.get('best_epoch') or '–'} | {stopped_by_text(r)} | {'–' if spe is None else f'{spe:.1f}'} | "
                  f"{r.get('device', '–')} | {kernels} | {', '.join(note)} |")
    md += ["", "## Settings", "",
           "Per-model settings passed on top of config.yaml and datasets/<dataset>.yaml "
           "(`MODEL_SETTINGS` in ssd4rec/reproduce/plan.py). Every baseline also gets "
           "MAX_ITEM_LIST_LENGTH from the dataset's YAML; the training protocol (Adam, learning "
           "rate, batch size, early stopping on validation NDCG@10) is config.yaml's for all models.",
           "", "| Model | Settings | Source |", "|---|---|---|"]
    for model in models:
        md.append(f"| {model} | {_settings_text(model)} | {SETTINGS_SOURCES.get(model, '–')} |")
    md.append("")
    return "\n".join(md), rows.getvalue()


def _kernels_text(record: dict) -> str:
    """The kernels of the record's last session, and of any earlier sessions that used others
    (a run continued on a machine without, say, the causal_conv1d package, or with another
    chunk_size or compile_glue), by epochs."""
    def text(session):
        chosen = {k: v for k, v in (session.get("overrides") or {}).items() if k in IMPLEMENTATION_KEYS}
        return "; ".join(f"{k}: {v}" for k, v in {**(session.get("implementation") or {}), **chosen}.items())

    spans = []  # [first epoch, last epoch, kernels], neighbours with the same kernels merged
    sessions = list(record.get("earlier_segments") or []) + [record]
    for session in sessions:
        first = spans[-1][1] + 1 if spans else 1
        kernels, last_epoch = text(session), session.get("epochs") or first - 1
        if spans and spans[-1][2] == kernels:
            spans[-1][1] = last_epoch
        elif last_epoch >= first:
            spans.append([first, last_epoch, kernels])
    if len(spans) <= 1:
        return text(record)
    *earlier, (first, last_epoch, kernels) = spans
    before = " / ".join(f"epochs {a}–{b}: {k}" for a, b, k in earlier)
    return f"epochs {first}–{last_epoch}: {kernels} ({before})"


def write_report(store: ResultStore, datasets: Optional[list[str]] = None,
                 models: Optional[list[str]] = None) -> str:
    """Write table.md and table.csv into the store's folder; returns the markdown.

    Datasets and models default to what the store holds; given ones come first, in their
    order, followed by any others the store holds."""
    records = list(store.iter_runs())
    no_data, no_model = store.unavailable_datasets(), store.unavailable_models()
    have_d = [r["dataset"] for r in records] + list(no_data) + [d for d, _ in no_model]
    have_m = [r["model"] for r in records] + [m for _, m in no_model]
    datasets = list(dict.fromkeys(list(datasets or []) + have_d))
    models = list(dict.fromkeys(list(models or []) + have_m))
    title = "SSD4Rec reproduction" + (f" ({store.variant} runs)" if store.variant else "")
    md, table_csv = build_report(records, datasets, models, no_data, no_model, title=title)
    md_path, csv_path = store.table_paths()
    md_path.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((md_path, md), (csv_path, table_csv)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return md
