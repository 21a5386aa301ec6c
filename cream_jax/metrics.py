"""Run outputs: metric logs, progress bars, results files, the results plot and table, samples.

  MetricWriter    flat ``{"train/loss": x, "consistency/tau": y}`` dicts -> TensorBoard event files
                  (tensorboardX) and ``metrics.jsonl``; text -> TensorBoard and ``text.jsonl``.
  progress        the one tqdm configuration of the code base.
  write_results   ``results.json`` (strict JSON) + ``results.csv`` (one row per iteration).
  plot_results    PNG: accuracy per task and consistency (mean +- std) per iteration.
  format_table    the final terminal table.
  log_samples     ``samples/iter_<t>.jsonl`` for a human to read.

Every file writer is a no-op outside process 0 and replaces its file atomically (tmp + rename),
so a killed run never leaves a half-written results file. No array shapes are interpreted here.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tqdm

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
METRICS_JSONL = "metrics.jsonl"
TEXT_JSONL = "text.jsonl"
NO_PROGRESS_ENV = "CREAM_JAX_NO_PROGRESS"

# Keys every row of ``iterations`` must have (others are kept as they are).
RESULT_KEYS = ("iteration", "accuracy", "reward_accuracy", "consistency", "pairs_kept", "seconds")


def _is_primary() -> bool:
    return jax.process_index() == 0


def _atomic_write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


def _number(value: Any, where: str) -> float:
    """A Python float from a Python/numpy/jax scalar; ValueError naming ``where`` otherwise."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, (np.generic, np.ndarray, jax.Array)) and np.size(value) == 1:
        dtype = value.dtype
        if jax.dtypes.issubdtype(dtype, np.number) or jax.dtypes.issubdtype(dtype, np.bool_):
            return float(np.asarray(value, np.float64).reshape(()))
    raise ValueError(f"{where}: expected a scalar number, got {type(value).__name__}")


def _plain(value: Any, where: str, *, strict: bool) -> Any:
    """JSON-compatible copy: numpy/jax scalars and arrays -> numbers/lists, tuples -> lists.

    With ``strict`` non-finite floats become None (strict JSON has no NaN).
    """
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: key {key!r} is not a string")
            out[key] = _plain(item, f"{where}[{key!r}]", strict=strict)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]", strict=strict) for i, item in enumerate(value)]
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int) and not isinstance(value, np.generic):
        return value
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) > 0:
        return [_plain(item, f"{where}[{i}]", strict=strict) for i, item in enumerate(np.asarray(value))]
    if isinstance(value, (np.integer, np.bool_)) or (
        isinstance(value, (np.ndarray, jax.Array)) and jax.dtypes.issubdtype(value.dtype, np.integer)
    ):
        return np.asarray(value).item()
    number = _number(value, where)
    return None if strict and not math.isfinite(number) else number


# ---------------------------------------------------------------------------------------------
# MetricWriter
# ---------------------------------------------------------------------------------------------


def _summary_writer_cls():
    """tensorboardX's SummaryWriter, imported without dragging in torch.

    tensorboardX's writer module tries ``import torch`` only to accept torch tensors; with torch
    installed (for the tests) that import costs ~2 s and a lot of memory in every training process.
    We log Python floats, so the import is blocked while tensorboardX loads, unless torch is
    already loaded anyway.
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        import tensorboardX  # noqa: PLC0415

        return tensorboardX.SummaryWriter
    sys.modules["torch"] = None  # makes ``import torch`` raise ImportError
    try:
        import tensorboardX  # noqa: PLC0415
    finally:
        del sys.modules["torch"]
    return tensorboardX.SummaryWriter


class MetricWriter:
    """Scalars to TensorBoard and ``metrics.jsonl``; text to TensorBoard and ``text.jsonl``.

    Each ``metrics.jsonl`` line is ``{"step": s, "wall_time": t, "<name>": value, ...}``; None
    values are kept there and skipped in TensorBoard; NaN/inf are written as ``NaN``/``Infinity``
    (read by Python's json and pandas) because a diverging metric is what one looks for.

    Args:
      logdir: directory for the event files and JSONL logs (created).
      enabled: write anything at all; default: only on process 0.
      purge_step: for a resumed run: events and JSONL lines with ``step >= purge_step`` from the
        interrupted run are dropped, so replayed steps are not logged twice.
    """

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool | None = None, purge_step: int | None = None):
        self.logdir = Path(logdir)
        self.enabled = _is_primary() if enabled is None else enabled
        self._tb = None
        self._jsonl = None
        if not self.enabled:
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        if purge_step is not None:
            for name in (METRICS_JSONL, TEXT_JSONL):
                self._purge(self.logdir / name, purge_step)
        self._tb = _summary_writer_cls()(str(self.logdir), purge_step=purge_step, flush_secs=30)
        self._jsonl = open(self.logdir / METRICS_JSONL, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    @staticmethod
    def _purge(path: Path, purge_step: int) -> None:
        if not path.exists():
            return
        kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] < purge_step]
        _atomic_write(path, "".join(line + "\n" for line in kept))

    def scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs a flat dict of scalars (Python, numpy or jax; jax values are fetched here)."""
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": int(step), "wall_time": time.time()}
        for name, value in metrics.items():
            if not isinstance(name, str) or name in record:
                raise ValueError(f"MetricWriter.scalars: metric name {name!r} must be a str other than 'step'/'wall_time'")
            record[name] = None if value is None else _number(value, f"MetricWriter.scalars: metric {name!r}")
        for name, value in record.items():
            if name not in ("step", "wall_time") and value is not None:
                self._tb.add_scalar(name, value, int(step), walltime=record["wall_time"])
        self._jsonl.write(json.dumps(record) + "\n")

    def text(self, step: int, tag: str, text: str) -> None:
        if not self.enabled:
            return
        if not isinstance(text, str):
            raise ValueError(f"MetricWriter.text: text for tag {tag!r} must be a str, got {type(text).__name__}")
        self._tb.add_text(tag, text, int(step))
        with open(self.logdir / TEXT_JSONL, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(step), "tag": tag, "text": text}, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled and self._tb is not None:
            self._tb.close()
            self._jsonl.close()
            self._tb = self._jsonl = None
            self.enabled = False

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Progress bars
# ---------------------------------------------------------------------------------------------


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str,
    disable: bool | None = None,
    leave: bool = True,
    **kwargs: Any,
) -> tqdm.tqdm:
    """A tqdm bar with the project's settings (pass ``leave=False`` for inner loops).

    Disabled when ``disable`` is True, or (``disable=None``) when ``CREAM_JAX_NO_PROGRESS=1`` or on
    processes other than 0. Extra keyword arguments (``initial=``, ``unit=``...) go to tqdm.
    """
    if disable is None:
        disable = os.environ.get(NO_PROGRESS_ENV, "") == "1" or not _is_primary()
    return tqdm.tqdm(
        iterable, total=total, desc=desc, disable=disable, leave=leave, dynamic_ncols=True, mininterval=0.5, **kwargs
    )


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def _check_row(row: Any, i: int) -> dict:
    where = f"write_results: iterations[{i}]"
    if not isinstance(row, Mapping):
        raise ValueError(f"{where} must be a dict, got {type(row).__name__}")
    missing = [k for k in RESULT_KEYS if k not in row]
    if missing:
        raise ValueError(f"{where} is missing {missing}")
    out = _plain(row, where, strict=True)
    if not isinstance(out["iteration"], int) or isinstance(out["iteration"], bool):
        raise ValueError(f"{where}['iteration'] must be an int, got {row['iteration']!r}")
    for key in ("accuracy", "seconds"):
        value = out[key]
        if not isinstance(value, dict) or not all(v is None or isinstance(v, (int, float)) for v in value.values()):
            raise ValueError(f"{where}[{key!r}] must be a dict of numbers, got {row[key]!r}")
    if out["reward_accuracy"] is not None and not isinstance(out["reward_accuracy"], (int, float)):
        raise ValueError(f"{where}['reward_accuracy'] must be a number or None, got {row['reward_accuracy']!r}")
    cons = out["consistency"]
    if cons is not None and (not isinstance(cons, dict) or not {"mean", "std"} <= set(cons)):
        raise ValueError(f"{where}['consistency'] must be None or a dict with 'mean' and 'std', got {row['consistency']!r}")
    if out["pairs_kept"] is not None and not isinstance(out["pairs_kept"], int):
        raise ValueError(f"{where}['pairs_kept'] must be an int or None, got {row['pairs_kept']!r}")
    return out


def _flatten(row: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if value is None and not prefix and key == "consistency":
            continue  # its columns stay empty for this row
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, list):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def _csv_columns(rows: list[dict]) -> list[str]:
    """iteration, accuracy/*, reward_accuracy, consistency/*, pairs_kept, seconds/*, then extras;
    within a group, names in first-seen order."""
    seen: list[str] = ["iteration", "reward_accuracy", "consistency/mean", "consistency/std", "pairs_kept"]
    for row in rows:
        for name in _flatten(row):
            if name not in seen:
                seen.append(name)
    groups = ["iteration", "accuracy/", "reward_accuracy", "consistency", "pairs_kept", "seconds/"]

    def rank(name: str) -> int:
        for i, group in enumerate(groups):
            if name == group or name.startswith(group if group.endswith("/") else group + "/"):
                return i
        return len(groups)

    return sorted(seen, key=lambda name: (rank(name), seen.index(name)))


def _csv_cell(value: Any) -> Any:
    return "" if value is None else value


def write_results(directory: str | os.PathLike, config: Mapping[str, Any], iterations: list[Mapping[str, Any]]) -> dict:
    """Writes ``results.json`` and ``results.csv`` (atomically) and returns the results dict.

    Args:
      directory: the run's workdir.
      config: the run's configuration as a JSON-able dict.
      iterations: one dict per evaluated model: ``{"iteration": t, "accuracy": {task: acc},
        "reward_accuracy": float | None, "consistency": {"mean": m, "std": s} | None,
        "pairs_kept": int | None, "seconds": {phase: s}}``; extra keys are kept as they are.
        Non-finite numbers are written as null.

    Returns:
      ``{"config": config, "iterations": [...]}`` as written (plain Python values).
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"write_results: config must be a dict, got {type(config).__name__}")
    rows = [_check_row(row, i) for i, row in enumerate(iterations)]
    numbers = [row["iteration"] for row in rows]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"write_results: iteration numbers repeat: {numbers}")
    results = {"config": _plain(config, "write_results: config", strict=True), "iterations": rows}
    if not _is_primary():
        return results
    directory = Path(directory)
    _atomic_write(directory / RESULTS_JSON, json.dumps(results, indent=2, allow_nan=False) + "\n")
    columns = _csv_columns(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = _flatten(row)
        writer.writerow({name: _csv_cell(flat.get(name)) for name in columns})
    _atomic_write(directory / RESULTS_CSV, buf.getvalue())
    return results


def _tasks(rows: list[Mapping[str, Any]]) -> list[str]:
    tasks: list[str] = []
    for row in rows:
        for task in row.get("accuracy") or {}:
            if task not in tasks:
                tasks.append(task)
    return tasks


def _average(acc: Mapping[str, Any]) -> float | None:
    values = [v for v in (acc or {}).values() if v is not None]
    return sum(values) / len(values) if values else None


def plot_results(results: Mapping[str, Any], path_png: str | os.PathLike) -> None:
    """Two-panel PNG: accuracy per task (and their average) and consistency mean +- std, against
    the iteration. Uses matplotlib's Agg canvas directly (no pyplot state, no GUI backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - matplotlib is slow to import
    from matplotlib.figure import Figure  # noqa: PLC0415

    if not _is_primary():
        return
    rows = sorted(results["iterations"], key=lambda r: r["iteration"])
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_acc, ax_cons = fig.subplots(1, 2)
    xs = [r["iteration"] for r in rows]
    for task in _tasks(rows):
        points = [(r["iteration"], r["accuracy"].get(task)) for r in rows if r["accuracy"].get(task) is not None]
        ax_acc.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=task)
    averages = [(r["iteration"], _average(r["accuracy"])) for r in rows if _average(r["accuracy"]) is not None]
    if averages:
        ax_acc.plot([p[0] for p in averages], [p[1] for p in averages], "k--", marker="s", label="average")
    ax_acc.set(title="Accuracy per task", xlabel="iteration", ylabel="accuracy", ylim=(0.0, 1.0))
    ax_acc.set_xticks(xs)
    if ax_acc.lines:
        ax_acc.legend(fontsize=8)
    cons = [
        (r["iteration"], r["consistency"]["mean"], r["consistency"]["std"] or 0.0)
        for r in rows
        if r.get("consistency") and r["consistency"].get("mean") is not None
    ]
    if cons:
        ax_cons.errorbar([c[0] for c in cons], [c[1] for c in cons], yerr=[c[2] for c in cons], marker="o", capsize=4)
    else:
        ax_cons.text(0.5, 0.5, "no consistency measured", ha="center", va="center", transform=ax_cons.transAxes)
    ax_cons.set(title="Consistency (mean ± std over prompts)", xlabel="iteration", ylabel="consistency", ylim=(0.0, 1.0))
    ax_cons.set_xticks(xs)
    method = (results.get("config") or {}).get("method")
    if method:
        fig.suptitle(f"method: {method}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _atomic_write(Path(path_png), buf.getvalue())


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: Mapping[str, Any]) -> str:
    """The final terminal table: one line per iteration with accuracy per task, their average,
    reward accuracy, consistency mean±std, pairs kept, the greedy eval answers' mean length in tokens
    and seconds (``seconds["total"]`` if given, else the sum of the phases, which should then not
    overlap). Missing values print as "-"."""
    rows = sorted(results["iterations"], key=lambda r: r["iteration"])
    tasks = _tasks(rows)
    with_model = any("model" in r for r in rows)
    header = ["iter"] + (["model"] if with_model else []) + tasks + ["avg", "reward acc", "consistency", "pairs", "answer tok", "seconds"]
    body = []
    for r in rows:
        cons = r.get("consistency")
        cons_text = "-" if not cons or cons.get("mean") is None else f"{cons['mean']:.3f}±{_fmt(cons.get('std'), '.3f')}"
        phases = r.get("seconds") or {}
        seconds = phases["total"] if phases.get("total") is not None else sum(v for v in phases.values() if v is not None)
        body.append(
            [str(r["iteration"])]
            + ([str(r.get("model", "-"))] if with_model else [])
            + [_fmt(r["accuracy"].get(task), ".3f") for task in tasks]
            + [_fmt(_average(r["accuracy"]), ".3f"), _fmt(r.get("reward_accuracy"), ".3f"), cons_text,
               "-" if r.get("pairs_kept") is None else str(int(r["pairs_kept"])),
               _fmt((r.get("response_tokens") or {}).get("eval"), ".1f"), f"{seconds:.1f}"]
        )
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    text_columns = {0, 1} if with_model else {0}

    def render(line: list[str]) -> str:
        return "  ".join(cell.ljust(w) if i in text_columns else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(header), rule] + [render(line) for line in body])


def log_eval_items(directory: str | os.PathLike, iteration: int, items: list[Mapping[str, Any]]) -> Path:
    """Writes ``samples/eval_<t>.jsonl``: one record per evaluated item (t = -1 for M0, 0 for M1, t
    for M_{t+1}), replaced as a whole (a resumed evaluation rewrites it)."""
    return _write_records(Path(directory) / "samples" / f"eval_{int(iteration)}.jsonl", items, "log_eval_items: items")


def log_samples(directory: str | os.PathLike, iteration: int, samples: list[Mapping[str, Any]]) -> Path:
    """Writes ``samples/iter_<t>.jsonl``: one JSON object per sample (e.g. prompt, responses,
    rewards, chosen, rejected), replaced as a whole (a resumed iteration rewrites it).

    Returns:
      The path written.
    """
    if not isinstance(samples, list) or not all(isinstance(s, Mapping) for s in samples):
        raise ValueError("log_samples: samples must be a list of dicts")
    return _write_records(Path(directory) / "samples" / f"iter_{int(iteration)}.jsonl", samples, "log_samples: samples")


def _write_records(path: Path, records: list[Mapping[str, Any]], what: str) -> Path:
    """One JSON line per record, the file replaced atomically, by the primary process only."""
    lines = [json.dumps(_plain(s, f"{what}[{i}]", strict=True), ensure_ascii=False) for i, s in enumerate(records)]
    if _is_primary():
        _atomic_write(path, "".join(line + "\n" for line in lines))
    return path
