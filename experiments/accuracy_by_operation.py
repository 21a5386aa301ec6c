"""Arithmetic accuracy split by operation: addition-only questions vs questions with a subtraction.

Usage: ``python experiments/accuracy_by_operation.py --root runs/smollm2_stage_b``

On the natural suite, answering the sum of every number in an arithmetic question is right on
exactly its addition-only items (35 of the first 64 test items): an accuracy that rises only there
can be the model learning to add everything up. This reads the per-item eval records every run
writes (``samples/eval_<t>.jsonl``: t = -1 M0, 0 M1, t M_{t+1}; runs made before they existed have
none and are skipped) and prints, per run directory and model, the accuracy on each kind of item
and the "sum of the question's numbers" baseline on the same items.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cream_jax.data.natural import ARITH_EVENTS  # noqa: E402

# The problem clauses of each operation, as regexes over the question ("loses {k}" -> r"loses \d+").
_CLAUSES = {op: [re.compile(re.escape(ask).replace(r"\{k\}", r"\d+")) for ask, _ in events]
            for op, events in ARITH_EVENTS.items()}


def operation_kind(question: str) -> str:
    """"add-only", "with sub" or "with mul" (a question with both names mul)."""
    if any(c.search(question) for c in _CLAUSES["mul"]):
        return "with mul"
    return "with sub" if any(c.search(question) for c in _CLAUSES["sub"]) else "add-only"


def sum_baseline(question: str, label: str) -> bool:
    """Whether answering the sum of every number in the question would be right."""
    return str(sum(int(n) for n in re.findall(r"\d+", question.split("\n")[0]))) == str(label).strip()


def split(records: list[dict]) -> dict[str, dict]:
    """{kind: {"n", "correct", "sum_baseline"}} over the arithmetic records."""
    out: dict[str, dict] = {}
    for r in records:
        if r.get("task") != "arith" or not r.get("question"):
            continue
        cell = out.setdefault(operation_kind(r["question"]), {"n": 0, "correct": 0, "sum_baseline": 0})
        cell["n"] += 1
        cell["correct"] += bool(r["correct"])
        cell["sum_baseline"] += sum_baseline(r["question"], r["label"])
    return out


def model_name(t: int) -> str:
    return "M0" if t == -1 else f"M{t + 1}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True, help="a run workdir, or a parent of run workdirs (any depth)")
    args = p.parse_args(argv)
    files = sorted(Path(args.root).glob("**/samples/eval_*.jsonl"))
    if not files:
        print(f"error: no samples/eval_<t>.jsonl under {args.root} (runs made before per-item records have none)",
              file=sys.stderr)
        return 1
    print(f"{'run':40s} {'model':5s} {'kind':9s} {'n':>3s} {'acc %':>6s} {'sum-baseline %':>15s}")
    for f in files:
        records = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        t = int(f.stem.split("_")[1])
        for kind, c in sorted(split(records).items()):
            print(f"{str(f.parent.parent.relative_to(args.root)):40s} {model_name(t):5s} {kind:9s} {c['n']:3d} "
                  f"{100 * c['correct'] / c['n']:6.1f} {100 * c['sum_baseline'] / c['n']:15.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
