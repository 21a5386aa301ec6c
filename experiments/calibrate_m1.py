"""M0 and M1 accuracy per task of a config, with 95% CIs: the calibration of the natural suite.

    python experiments/calibrate_m1.py --gin_file configs/models/smollm2_135m_instruct.gin \\
        [--gin_param 'Natural.arith_max_ops = 1' ...] [--n 48] --workdir runs/calibrate/x

Runs the trainer's own stages up to M1 (`cream_jax.loop.stages`: setup, M0 as loaded, SFT on the
seed set with the config's hyper-parameters) and evaluates M0 and M1 greedily on the first ``--n``
test items per task (`stages.evaluate_model`, i.e. exactly what a run's results rows report).
Prints accuracy with a Wilson 95% interval, the share of replies without a readable answer, the
stage times and the machine load, and writes them to ``<workdir>/calibration.json``.
Used for docs/natural_suite.md (issue 13: M1 between 20% and 60% on each task).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import jax

from cream_jax import config as config_lib
from cream_jax import steps, validate
from cream_jax import evaluate as evaluate_lib
from cream_jax.loop import stages
from cream_jax.loop import trainer as trainer_lib


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate(run, params, key, n: int) -> dict:
    acc, samples, _ = stages.evaluate_model(run, params, key, 0)  # also writes samples/eval_0.jsonl
    out = {}
    by_q = {s["question"]: s["answer"] for s in samples}
    for task, items in run.data.tests.items():
        items = items[:n]
        k = round(acc[task] * len(items))
        answers = [by_q.get(evaluate_lib._prompt(task, it, "")[-1]["content"]) for it in items]
        unreadable = sum(a is not None and evaluate_lib.extract_answer(a, evaluate_lib.task_kind(task)) is None
                         for a in answers)
        lo, hi = wilson(k, len(items))
        out[task] = {"accuracy": acc[task], "n": len(items), "ci95": [lo, hi], "no_answer": unreadable / len(items),
                     "replies": [{"label": it["label"], "reply": a} for it, a in zip(items, answers)]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gin_file", action="append", default=[])
    ap.add_argument("--gin_param", action="append", default=[])
    ap.add_argument("--n", type=int, default=48, help="test items per task")
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    load0 = os.getloadavg()[0]
    config_lib.parse_gin(args.gin_file, [*args.gin_param, f"Eval.num_per_task = {args.n}",
                                         f"Eval.num_logged_samples = {2 * args.n}"])
    validate.check_gin_bindings()
    cfg = config_lib.build_run_config()
    run, params0 = stages.setup(cfg, args.workdir)
    key = jax.random.key(cfg.seed)
    times = {"setup": run.setup_seconds}
    tic = time.perf_counter()
    m0 = evaluate(run, params0, key, args.n)
    times["eval_m0"] = time.perf_counter() - tic
    tic = time.perf_counter()
    chats = run.data.sft + run.method.sft_examples(run.data.eft)
    m1_params = run.trainer.train(
        name="sft", loss_fn=steps.lm_loss, loss_key="lm", optim=cfg.sft.optim, params=params0,
        records=trainer_lib.sft_records(run.tokenizer, chats, cfg.sft.max_len), epochs=cfg.sft.epochs,
        progress_base={"stage": "sft"}, resume=None, seed=cfg.seed + 1)
    times["sft"] = time.perf_counter() - tic
    tic = time.perf_counter()
    m1 = evaluate(run, m1_params, jax.random.fold_in(key, 0), args.n)
    times["eval_m1"] = time.perf_counter() - tic
    result = {"gin_files": args.gin_file, "gin_params": args.gin_param, "sft_chats": len(chats),
              "M0": m0, "M1": m1, "seconds": times, "load": [load0, os.getloadavg()[0]]}
    Path(args.workdir, "calibration.json").write_text(json.dumps(result, indent=1))
    for name, rows in (("M0", m0), ("M1", m1)):
        for task, r in rows.items():
            print(f"{name} {task:7s} n={r['n']:3d} acc {r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
                  f"no answer {r['no_answer']:.2f}")
    print("seconds", {k: round(v, 1) for k, v in times.items()}, "load", result["load"])


if __name__ == "__main__":
    main()
