"""Wall time of one CREAM iteration by phase, XLA compilations after the first, and cost growth in N and pool size.

Usage: ``PYTHONPATH=. python bench/iteration.py [--quick] [--pretrain_steps 50] [--sft_epochs 0]
[--iterations 3] [--ns 2,4,8,16] [--pools 64,128,256,512] [--n_sweep_pool 64] [--pool_sweep_n 4]``

``--quick``: 10 pre-training steps, 1 SFT epoch, 2 iterations of 64 prompts (32 test items per task),
N in 2,4 (32 prompts), pools 32,128 (N = 4): a smoke run, its slopes rest on two points.

1. The embedded default (``configs/tiny_cpu.gin``, method CREAM) with a reduced pre-training
   (``Pretrain.steps`` = ``--pretrain_steps`` instead of the default 400; SFT as configured) runs end to end
   through ``cream_jax.train.run_loop``. Each iteration's wall time is split by phase: sample (N
   responses per prompt with M_t), score under M_t, M_{t-1} and M0 (one forward each; at t = 1 the
   M0 forward also serves as M_{t-1}'s ranking), reward (decoding, oracle check, implicit rewards on
   the host), consistency (Kendall tau per prompt), pairs, train (DPO steps), eval (greedy test
   accuracy). XLA compilations per iteration come from the trainer's own counter; the goal is 0 for
   iterations >= 2.
2. Growth: the same loop from the base run's M0 and M1 (copied, so nothing is re-trained) for
   each N in ``--ns`` (pool fixed) and each pool size in ``--pools`` (N fixed), two iterations each;
   iteration 2 is timed (iteration 1 compiles the new shapes). Evaluation is cut to 8 items per task
   (batch 16) in these runs and left out of the fitted time, as it depends on neither N nor the pool. The
   exponent is the least-squares slope of log(time) on log(N) or log(pool size).

Every phase time comes from the loop's own results rows (``seconds``: the rollout, each model's
forwards in the log-prob table, rewards, consistency, pairs, train, eval; pre-training and SFT in
row 0), written by ``cream_jax.loop.stages.run_loop``: the script neither wraps nor patches it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("CREAM_JAX_NO_PROGRESS", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cream_jax import config as config_lib  # noqa: E402
from cream_jax.loop import stages  # noqa: E402

GIN_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny_cpu.gin")
PHASES = ("sample", "score M_t", "score M_t-1", "score M0", "reward", "consistency", "pairs", "train", "eval")


def phases(row: dict) -> dict:
    """Per-phase seconds of one results row, with the scoring split by model (relative to t)."""
    t, s = row["iteration"], row["seconds"]
    out = {k: s[k] for k in ("sample", "reward", "consistency", "pairs", "train", "eval", "total")}
    out.update({"score M_t": 0.0, "score M_t-1": 0.0, "score M0": 0.0})
    for name, sec in s.items():
        if name.startswith("score M"):
            k = int(name.removeprefix("score M"))
            out["score M_t" if k == t else "score M0" if k == 0 else "score M_t-1"] += sec
    return out


def make_config(bindings: list[str]) -> config_lib.RunConfig:
    config_lib.parse_gin([GIN_FILE], bindings)
    return config_lib.build_run_config()


def run(cfg: config_lib.RunConfig, workdir: str) -> tuple[list[dict], float]:
    """``run_loop`` with its closing table silenced; (every results row, wall seconds)."""
    tic = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        out = stages.run_loop(cfg, workdir)
    return out["iterations"], time.perf_counter() - tic


def slope(x: list[float], y: list[float]) -> float:
    """Least-squares exponent k of y ~ x^k."""
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short pre-training, 2 iterations, smaller sweeps")
    p.add_argument("--pretrain_steps", type=int, default=50)
    p.add_argument("--sft_epochs", type=int, default=0, help="0: as configured (3)")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--base_pool", type=int, default=0,
                   help="prompts per iteration of the base run (0: as configured, 256)")
    p.add_argument("--ns", default="2,4,8,16", help="responses per prompt for the N sweep")
    p.add_argument("--pools", default="64,128,256,512", help="prompts per iteration for the pool sweep")
    p.add_argument("--n_sweep_pool", type=int, default=64, help="prompts per iteration during the N sweep")
    p.add_argument("--pool_sweep_n", type=int, default=4, help="responses per prompt during the pool sweep")
    args = p.parse_args()
    if args.quick:
        args.pretrain_steps, args.sft_epochs, args.iterations, args.base_pool = 10, 1, 2, 64
        args.ns, args.pools, args.n_sweep_pool = "2,4", "32,128", 32
    if args.iterations < 2:
        p.error("--iterations must be >= 2 (compilations are counted in iterations >= 2)")
    for value in args.pools.split(",") + [str(args.n_sweep_pool), str(args.base_pool)]:
        if int(value) % 2:
            p.error(f"pool sizes must be even (the suite draws pool/2 prompts per task), got {value}")

    tmp = tempfile.mkdtemp(prefix="cream_bench_iter_")
    try:
        base_bindings = [f"Pretrain.steps = {args.pretrain_steps}", f"Run.iterations = {args.iterations}"]
        if args.sft_epochs:
            base_bindings.append(f"SFT.epochs = {args.sft_epochs}")
        if args.base_pool:
            base_bindings.append(f"Suite.pool_per_iteration = {args.base_pool // 2}")
        if args.quick:
            base_bindings.append("Eval.num_per_task = 32")
        base_cfg = make_config(base_bindings)
        rows, base_wall = run(base_cfg, os.path.join(tmp, "base"))
        base = [(r["iteration"], phases(r), r["compiles"], r["pairs_kept"]) for r in rows if r["iteration"] >= 1]
        base_prompts = rows[1]["prompts"]
        stage_seconds = rows[0]["seconds"]

        done: dict[tuple[int, int], tuple[dict, int]] = {}

        def sweep(n: int, pool: int) -> tuple[dict, int]:
            """Iteration 2's phases and compilations with N = n responses for ``pool`` prompts."""
            if (n, pool) in done:  # the point shared by both sweeps runs once
                return done[(n, pool)]
            wd = os.path.join(tmp, f"n{n}_pool{pool}")
            os.makedirs(os.path.join(wd, "models"))
            for m in ("m0", "m1"):  # the base run's M0 and M1: nothing is re-trained
                shutil.copytree(os.path.join(tmp, "base", "models", m), os.path.join(wd, "models", m))
            cfg = make_config([b for b in base_bindings if not b.startswith(("Run.iterations", "Suite.pool"))]
                              + ["Run.iterations = 2", "Eval.num_per_task = 8", "Eval.batch_size = 16",
                                 f"Sampling.num_samples = {n}",
                                 f"Suite.pool_per_iteration = {pool // 2}"])
            rows, _ = run(cfg, wd)
            row = next(r for r in rows if r["iteration"] == 2)
            done[(n, pool)] = (phases(row), row["compiles"])
            return done[(n, pool)]

        ns = [int(v) for v in args.ns.split(",")]
        pools = [int(v) for v in args.pools.split(",")]
        n_rows = [sweep(n, args.n_sweep_pool) for n in ns]
        pool_rows = [sweep(args.pool_sweep_n, q) for q in pools]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    m = base_cfg.model
    print(f"devices: {jax.devices()[0].device_kind} x{len(jax.devices())}, cores: {os.cpu_count()}, "
          f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}")
    print(f"embedded default (configs/tiny_cpu.gin), CREAM: LLaMA d={m.hidden_size} L={m.num_hidden_layers} "
          f"F={m.intermediate_size}, pre-training reduced to {args.pretrain_steps} steps ({stage_seconds['pretrain']:.0f} s), "
          f"SFT {base_cfg.sft.epochs} epochs ({stage_seconds['sft']:.0f} s); N={base_cfg.sampling.num_samples}, "
          f"{base_prompts} prompts/iteration, {base_cfg.sampling.max_new_tokens} new tokens; "
          f"whole run {base_wall:.0f} s")
    print("seconds per phase (score M_t-1 at t = 1: the M0 forward serves as M_{t-1}'s ranking)")
    cols = PHASES + ("total",)
    print(f"{'t':>2} " + " ".join(f"{c:>11}" for c in cols) + f" {'compiles':>8} {'pairs':>5}")
    for t, ph, compiles, pairs in base:
        print(f"{t:>2} " + " ".join(f"{ph[c]:11.2f}" for c in cols) + f" {compiles:8d} {pairs:5d}")
    later = [c for t, _, c, _ in base if t >= 2]
    print(f"XLA compilations in iterations >= 2: {sum(later)} (per iteration: {later})")

    def table(title: str, xs: list[int], sweep_rows: list[tuple[dict, int]], label: str):
        for r, _ in sweep_rows:
            r["score"] = r["score M_t"] + r["score M_t-1"] + r["score M0"]
            r["iteration"] = r["total"] - r["eval"]
        print(title)
        print(f"{label:>5} {'sample':>8} {'score':>8} {'consist.':>8} {'train':>8} {'iteration':>9} {'compiles':>8}")
        for x, (r, c) in zip(xs, sweep_rows):
            print(f"{x:>5} {r['sample']:8.2f} {r['score']:8.2f} {r['consistency']:8.3f} {r['train']:8.2f} "
                  f"{r['iteration']:9.2f} {c:8d}")
        fit = {k: slope(xs, [r[k] for r, _ in sweep_rows]) for k in ("iteration", "sample", "score", "train")}
        print(f"log-log slope: iteration (without eval) {fit['iteration']:.2f}, sample {fit['sample']:.2f}, "
              f"score {fit['score']:.2f}, train {fit['train']:.2f}")

    table(f"growth in N (iteration 2, {args.n_sweep_pool} prompts; seconds)", ns, n_rows, "N")
    table(f"growth in pool size (iteration 2, N = {args.pool_sweep_n}; seconds)", pools, pool_rows, "pool")


if __name__ == "__main__":
    main()
