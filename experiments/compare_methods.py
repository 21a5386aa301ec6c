"""Paired comparison of two methods' runs seed by seed: mean test accuracy of A minus B per model.

Usage: ``python experiments/compare_methods.py --root runs/smollm2_stage_b cream_dyn cream_avg``

A and B are run directory names under ``<root>/seed<k>/`` (as `experiments/paper_table.py` lays
them out). For each model the two runs both evaluated (M1 = iteration 0, M_{t+1} = iteration t)
and each seed both have, this prints the per-seed difference in points (the mean over tasks of the
accuracy), their mean and 95% Student-t interval over the seeds, and whether that interval
excludes 0. Runs that share M1 and seeds sample and rank the same responses at t = 1, so the
difference isolates what the methods do differently; the seeds' own spread cancels.
``--root_b`` reads B's runs under another root (e.g. a post-hoc variant's own root), paired by seed name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_table import _mean_accuracy, mean_ci  # noqa: E402


def accuracies(run: Path) -> dict[int, float]:
    """iteration -> mean accuracy in points, from a run's results.json ({} if it has none yet)."""
    path = run / "results.json"
    if not path.exists():
        return {}
    return {int(row["iteration"]): 100.0 * _mean_accuracy(row)
            for row in json.loads(path.read_text())["iterations"] if row.get("accuracy")}


def compare(root: Path, a: str, b: str, root_b: Path | None = None) -> list[dict]:
    """One row per model both methods have on at least one seed: per-seed A - B, mean, half-width.

    B's runs are under ``root_b`` (default ``root``), matched to A's by seed directory name.
    """
    root_b = root_b or root
    seeds = sorted((p for p in root.glob("seed*") if p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))
    per_seed = {p.name: (accuracies(p / a), accuracies(root_b / p.name / b)) for p in seeds}
    rows = []
    for t in sorted({t for acc_a, acc_b in per_seed.values() for t in acc_a.keys() & acc_b.keys()}):
        diffs = {s: acc_a[t] - acc_b[t] for s, (acc_a, acc_b) in per_seed.items() if t in acc_a and t in acc_b}
        mean, half = mean_ci(list(diffs.values()))
        rows.append({"model": f"M{t + 1}", "diffs": diffs, "mean": mean, "half": half,
                     "resolved": half is not None and (mean - half > 0 or mean + half < 0)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="the runs' root (seed0/, seed1/, ... below it)")
    ap.add_argument("a", help="run directory name of method A (e.g. cream_dyn)")
    ap.add_argument("b", help="run directory name of method B (e.g. cream_avg)")
    ap.add_argument("--root_b", type=Path, default=None, help="B's runs' root, if not --root")
    args = ap.parse_args(argv)
    rows = compare(args.root, args.a, args.b, args.root_b)
    if not rows:
        print(f"error: no seed under {args.root} (A) / {args.root_b or args.root} (B) has results for both {args.a} and {args.b}", file=sys.stderr)
        return 2
    print(f"{args.a} minus {args.b}: mean test accuracy (points), paired by seed")
    for row in rows:
        seeds = ", ".join(f"{s} {d:+.1f}" for s, d in row["diffs"].items())
        if row["half"] is None:
            print(f"{row['model']:4s} {seeds}; one seed, no interval")
            continue
        lo, hi = row["mean"] - row["half"], row["mean"] + row["half"]
        verdict = "excludes 0" if row["resolved"] else "includes 0"
        print(f"{row['model']:4s} {seeds}; mean {row['mean']:+.1f} ± {row['half']:.1f}, 95% t interval "
              f"[{lo:+.1f}, {hi:+.1f}] ({verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
