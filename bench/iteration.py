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

Phase times come from the trainer's per-iteration ``seconds`` (results rows); the split of the
scoring time by model and the consistency time are measured by timing wrappers around
``curate.score_sequences`` and ``curate.consistency_of`` installed by this script (they only read
the clock; the loop is unchanged).
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
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cream_jax import config as config_lib, curate, train  # noqa: E402

GIN_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny_cpu.gin")
PHASES = ("sample", "score M_t", "score M_t-1", "score M0", "reward", "consistency", "pairs", "train", "eval")


class PhaseClock:
    """Clock-only wrappers around the trainer's stages: ``setup`` (to see the run's resident models),
    ``curate_iteration`` (the current t), ``train_on_arrays`` (pre-training / SFT seconds), and the
    scoring and consistency calls inside ``curate_iteration``."""

    def __init__(self):
        self.run = None
        self.iteration = 0
        self.events: list[tuple[int, str, float]] = []  # (iteration, phase, seconds)
        self.stages: dict[str, float] = {}  # pre-training / SFT wall seconds of the last run
        self._orig = (train.setup, train.curate_iteration, train.train_on_arrays, curate.score_sequences,
                      curate.consistency_of)

    def _model_name(self, model) -> str:
        leaf = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
        for name, params in self.run.models.items():
            if jax.tree.leaves(params)[0] is leaf:
                return "M_t" if name == "policy" else "M0" if name == "m0" else "M_t-1"
        raise RuntimeError("scored model is none of the resident models; cannot attribute its time")

    def __enter__(self):
        setup, curate_iteration, train_on_arrays, score_sequences, consistency_of = self._orig

        def timed_setup(*args, **kwargs):
            self.run, params = setup(*args, **kwargs)
            return self.run, params

        def timed_curate(run, t, *args, **kwargs):
            self.iteration = t
            return curate_iteration(run, t, *args, **kwargs)

        def timed_train(run, *, name, **kwargs):
            tic = time.perf_counter()
            out = train_on_arrays(run, name=name, **kwargs)
            jax.block_until_ready(out)
            self.stages[name] = time.perf_counter() - tic
            return out

        def timed_score(model, *args, **kwargs):
            tic = time.perf_counter()
            out = score_sequences(model, *args, **kwargs)  # host arrays: the forwards are done
            self.events.append((self.iteration, f"score {self._model_name(model)}", time.perf_counter() - tic))
            return out

        def timed_consistency(*args, **kwargs):
            tic = time.perf_counter()
            out = consistency_of(*args, **kwargs)
            self.events.append((self.iteration, "consistency", time.perf_counter() - tic))
            return out

        train.setup, train.curate_iteration, train.train_on_arrays = timed_setup, timed_curate, timed_train
        curate.score_sequences, curate.consistency_of = timed_score, timed_consistency
        return self

    def __exit__(self, *exc):
        (train.setup, train.curate_iteration, train.train_on_arrays, curate.score_sequences,
         curate.consistency_of) = self._orig

    def phases(self, row: dict) -> dict:
        """Per-phase seconds of one results row, with scoring split by model and consistency apart."""
        t = row["iteration"]
        mine = {}
        for it, phase, sec in self.events:
            if it == t:
                mine[phase] = mine.get(phase, 0.0) + sec
        s = row["seconds"]
        out = {"sample": s["sample"], "reward": s["reward"], "train": s["train"], "eval": s["eval"]}
        out.update({k: mine.get(k, 0.0) for k in ("score M_t", "score M_t-1", "score M0", "consistency")})
        out["pairs"] = s["pairs"] - out["consistency"]
        # What the scoring wrappers did not see (e.g. host reshapes) stays in the model-less remainder.
        out["score other"] = s["score"] - sum(out[k] for k in ("score M_t", "score M_t-1", "score M0"))
        out["total"] = s["total"]
        return out


def make_config(bindings: list[str]) -> config_lib.RunConfig:
    config_lib.parse_gin([GIN_FILE], bindings)
    return config_lib.build_run_config()


def run(cfg: config_lib.RunConfig, workdir: str, clock: PhaseClock) -> tuple[list[dict], float]:
    """``run_loop`` with its closing table silenced; (results rows of iterations >= 1, wall seconds)."""
    clock.events.clear()
    clock.stages.clear()
    tic = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        out = train.run_loop(cfg, workdir)
    return [r for r in out["iterations"] if r["iteration"] >= 1], time.perf_counter() - tic


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
    clock = PhaseClock()
    try:
        with clock:
            base_bindings = [f"Pretrain.steps = {args.pretrain_steps}", f"Run.iterations = {args.iterations}"]
            if args.sft_epochs:
                base_bindings.append(f"SFT.epochs = {args.sft_epochs}")
            if args.base_pool:
                base_bindings.append(f"Suite.pool_per_iteration = {args.base_pool // 2}")
            if args.quick:
                base_bindings.append("Eval.num_per_task = 32")
            base_cfg = make_config(base_bindings)
            rows, base_wall = run(base_cfg, os.path.join(tmp, "base"), clock)
            base = [(r["iteration"], clock.phases(r), r["compiles"], r["pairs_kept"]) for r in rows]
            base_prompts = len(clock.run.data.pools[0])
            stages = dict(clock.stages)

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
                rows, _ = run(cfg, wd, clock)
                row = next(r for r in rows if r["iteration"] == 2)
                done[(n, pool)] = (clock.phases(row), row["compiles"])
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
          f"F={m.intermediate_size}, pre-training reduced to {args.pretrain_steps} steps ({stages['pretrain']:.0f} s), "
          f"SFT {base_cfg.sft.epochs} epochs ({stages['sft']:.0f} s); N={base_cfg.sampling.num_samples}, "
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
            r["score"] = r["score M_t"] + r["score M_t-1"] + r["score M0"] + r["score other"]
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
