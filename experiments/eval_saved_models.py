"""Evaluates a finished run's saved models again and writes their per-item eval records.

Usage: ``python experiments/eval_saved_models.py runs/smollm2_stage_b/seed0/cream_dyn [...] [--tasks arith]``

Runs made before every eval wrote ``samples/eval_<t>.jsonl`` have accuracies but no per-item
records. This rebuilds each run's config from the command in its ``train.log``, evaluates its
``models/m<k>`` greedily on the same test items (the run's ``Eval.num_per_task``), writes
``samples/eval_<k-1>.jsonl`` into the run directory, and checks that the accuracies equal the run's
own rows (greedy decoding: the same answers). ``--tasks`` restricts the eval to some tasks (the
check then covers those only). A run still being written is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def local_config(path: str) -> str:
    """A gin file of the run's command: as written if it exists here, else this checkout's copy."""
    parts = Path(path).parts
    if Path(path).exists() or "configs" not in parts:
        return path
    last = len(parts) - 1 - parts[::-1].index("configs")  # the checkout's own configs/, not a parent folder's
    return str(REPO.joinpath(*parts[last:]))


def run_command_args(workdir: Path) -> tuple[list[str], list[str]]:
    """(gin files, bindings) of the first command in the run's train.log."""
    first = next(line for line in (workdir / "train.log").read_text().splitlines() if line.startswith("$ "))
    argv = shlex.split(first[2:])
    files = [argv[i + 1] for i, a in enumerate(argv) if a == "--gin_file"]
    bindings = [argv[i + 1] for i, a in enumerate(argv) if a == "--gin_param"]
    return files, bindings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="finished run workdirs")
    p.add_argument("--tasks", default="", help="comma-separated tasks to evaluate (default: all)")
    args = p.parse_args(argv)
    import jax  # noqa: PLC0415 - after argparse: --help stays instant

    from cream_jax import checkpoint, config as config_lib  # noqa: PLC0415
    from cream_jax.loop import stages  # noqa: PLC0415

    tasks = [t for t in args.tasks.split(",") if t]
    failures = 0
    for workdir in map(Path, args.runs):
        results = json.loads((workdir / "results.json").read_text())
        cfg0 = results["config"]
        if not any(r["iteration"] == cfg0["iterations"] for r in results["iterations"]):
            print(f"error: {workdir}: not finished (no row for iteration {cfg0['iterations']})", file=sys.stderr)
            return 1
        files, bindings = run_command_args(workdir)
        files = [local_config(f) for f in files]
        config_lib.parse_gin(files, bindings)
        cfg = config_lib.build_run_config()
        with tempfile.TemporaryDirectory() as tmp:
            run, params0 = stages.setup(cfg, Path(tmp) / "run")
            if tasks:
                run.data = dataclasses.replace(run.data, tests={t: run.data.tests[t] for t in tasks})
            store = checkpoint.ModelStore(workdir / "models")
            try:
                failures += _evaluate_saved(workdir, results, run, store, stages._abstract(params0))
            finally:
                stages._close_all(store.close, run.ckpt.close, run.store.close, run.writer.close)
    return 1 if failures else 0


def _evaluate_saved(workdir: Path, results: dict, run, store, abstract) -> int:
    """Evaluates every saved M_k of ``workdir`` again (``run`` set up in a scratch workdir, whose
    records are copied into ``workdir/samples``); returns how many accuracies differ from the run's rows."""
    import jax  # noqa: PLC0415 - imported by main already; lazy for an instant --help

    from cream_jax.loop import stages  # noqa: PLC0415

    failures = 0
    for row in results["iterations"]:
        name = f"m{row['iteration'] + 1}"
        if not (workdir / "models" / name).exists():
            print(f"{workdir} {name}: no saved model, skipped")
            continue
        params = store.load(name, abstract)
        acc, _, _ = stages.evaluate_model(run, params, jax.random.key(0), row["iteration"])
        out = workdir / "samples" / f"eval_{row['iteration']}.jsonl"
        out.parent.mkdir(exist_ok=True)
        shutil.copyfile(run.workdir / "samples" / f"eval_{row['iteration']}.jsonl", out)
        same = all(abs(acc[t] - row["accuracy"][t]) < 1e-9 for t in acc)
        failures += not same
        print(f"{workdir} {row['model']}: accuracy {acc} (run's row: "
              f"{ {t: row['accuracy'][t] for t in acc} }) {'same' if same else 'DIFFERENT'}; wrote {out}",
              flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main())
