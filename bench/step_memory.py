"""Compiled memory of a train step at SmolLM2-135M's shape, per remat mode and gradient
accumulation: the figures behind the SmolLM2 preset's ``Model.remat_policy`` and the stage B SCIR
runs' ``Model.remat_policy = 'full'`` (docs/results.md).

    PYTHONPATH=$PWD python bench/step_memory.py [--loss sft|dpo|scir] [--batch 16] [--length 256]
        [--judge_length 448,768] [--remat none,full,matmuls] [--accum 1,4] [--mesh 2,2,2]

``sft``: `steps.lm_loss` on ``batch x length`` rows. ``dpo``: the DPO step on ``batch`` pairs of
``length`` tokens. ``scir``: the same pairs plus SCIR's pairwise judge prompts (both orders, one row
each per pair, ``judge_length`` tokens), judged with gradients inside the step
(`steps.make_scir_loss`). Abstract (no weights, `cream_jax.plan.abstract_params`), one device;
prints ``compiled.memory_analysis()``'s argument and temporary bytes.

``--mesh data,fsdp,tensor`` compiles the step for that mesh instead (fake CPU devices:
``XLA_FLAGS=--xla_force_host_platform_device_count=8``); the figures are then per device, and the
bytes each collective family produces on a device per step are printed too (its result shapes in
the compiled HLO, a loop body's counted once per iteration).
"""

from __future__ import annotations

import argparse
import os
import re
import time

import jax
import jax.numpy as jnp

from cream_jax import sharding, steps
from cream_jax.config import OptimConfig
from cream_jax.models import presets
from cream_jax.plan import _rows, _scalar, abstract_params


def make_batch(loss: str, mesh, batch: int, length: int, judge_length: int) -> dict:
    if loss == "sft":
        rows = {k: _rows(mesh, (batch, length)) for k in ("input_ids", "attention_mask", "loss_mask")}
    else:
        rows = {f"{side}_{k}": _rows(mesh, (batch, length)) for side in ("chosen", "rejected") for k in ("ids", "mask", "resp")}
        rows.update({k: _rows(mesh, (batch,), jnp.float32) for k in ("ref_chosen", "ref_rejected", "consistency")})
    if loss == "scir":
        rows.update({f"judge{order}_{k}": _rows(mesh, (batch, judge_length)) for order in ("12", "21") for k in ("ids", "mask")})
    rows["weight"] = _rows(mesh, (batch,), jnp.float32)
    rows["lr"] = _scalar(mesh)
    return rows


_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f16": 2, "bf16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}
_SHAPE = r"\b(%s)\[([\d,]*)\]" % "|".join(_BYTES)
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _nbytes(dtype: str, dims: str) -> int:
    n = _BYTES[dtype]
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n


def _computations(hlo: str) -> dict[str, list[str]]:
    """The instruction lines of each computation of a compiled module's text ("ENTRY" for the entry)."""
    out, current = {}, None
    for line in hlo.splitlines():
        head = re.match(r"(ENTRY )?%([\w.\-]+) .*\{$", line)
        if head:
            current = "ENTRY" if head.group(1) else head.group(2)
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return out


def _executions(computations: dict[str, list[str]]) -> dict[str, int]:
    """How many times each computation runs per call: a while loop's body its known trip count (the
    layer scan: once per layer), every other callee once per caller run."""
    callers = {}
    for name, lines in computations.items():
        for line in lines:
            trips = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
            for kind, callee in re.findall(r"\b(body|condition|calls|to_apply)=%([\w.\-]+)", line):
                times = int(trips.group(1)) if trips and kind in ("body", "condition") else 1
                callers.setdefault(callee, []).append((name, times))
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                for callee in re.findall(r"%([\w.\-]+)", group):
                    callers.setdefault(callee, []).append((name, 1))

    memo = {"ENTRY": 1}

    def runs(name: str) -> int:
        if name not in memo:
            memo[name] = 0  # a cycle-free call graph; this only guards against a malformed module
            memo[name] = sum(runs(caller) * times for caller, times in callers.get(name, ()))
        return memo[name]

    return {name: runs(name) for name in computations}


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes that each collective family produces on a device per step: the result shapes in the
    compiled HLO times how often their computation runs (loop bodies once per iteration).

    Asynchronous pairs count their ``-done`` result only. XLA:CPU does not turn an all-reduce and a
    slice into a reduce-scatter as the GPU and TPU pipelines do, so on fake CPU devices the
    all-reduce figure is an upper bound of what those would move."""
    computations = _computations(hlo)
    runs = _executions(computations)
    totals = dict.fromkeys(_COLLECTIVES, 0)
    for name, lines in computations.items():
        for line in lines:
            op = re.search(r"= (.*?) (%s)(-done)?\(" % "|".join(_COLLECTIVES), line)
            if op:
                totals[op.group(2)] += runs[name] * sum(_nbytes(d, dims) for d, dims in re.findall(_SHAPE, op.group(1)))
    return totals


def collectives(hlo: str) -> str:
    return ", ".join(f"{op} {n / 2**20:.1f} MB" for op, n in collective_bytes(hlo).items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loss", default="sft", choices=("sft", "dpo", "scir"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--judge_length", default="448,768", help="scir only: comma-separated judge prompt lengths")
    ap.add_argument("--remat", default="none,full,matmuls")
    ap.add_argument("--accum", default="1")
    ap.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor")
    args = ap.parse_args()
    print(f"load {os.getloadavg()}")
    mesh = sharding.make_mesh(*(int(n) for n in args.mesh.split(",")))
    graphdef, params = abstract_params(presets.preset_config("smollm2_135m"), mesh)
    optimizer = steps.make_optimizer(OptimConfig())
    state = steps.abstract_train_state(params, optimizer)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    # The verdict ids only pick two logits; any two token ids give the same program.
    loss_fn = {"sft": steps.lm_loss, "dpo": steps.make_dpo_loss(0.1, "sigmoid"),
               "scir": steps.make_scir_loss(0.1, 1.0, 0.0, "skl", (16, 17), 1e-3)}[args.loss]
    judge_lengths = [int(n) for n in args.judge_length.split(",")] if args.loss == "scir" else [0]
    for judge_length in judge_lengths:
        batch = make_batch(args.loss, mesh, args.batch, args.length, judge_length)
        for remat in args.remat.split(","):
            for accum in (int(a) for a in args.accum.split(",")):
                tic = time.perf_counter()
                step = steps.make_train_step(loss_fn, graphdef, optimizer, mesh, state_shardings, accum, remat=remat)
                compiled = step.lower(state, batch).compile()
                mem = compiled.memory_analysis()
                judge = f" judge {judge_length}" if judge_length else ""
                print(f"{args.loss} batch {args.batch} x {args.length}{judge}  remat {remat:8s} accum {accum}:  "
                      f"args {mem.argument_size_in_bytes / 1e9:.2f} GB  temp {mem.temp_size_in_bytes / 1e9:.2f} GB  "
                      f"(compile {time.perf_counter() - tic:.0f} s)", flush=True)
                if mesh.size > 1:
                    print(f"  per device: {collectives(compiled.as_text())}", flush=True)


if __name__ == "__main__":
    main()
