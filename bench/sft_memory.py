"""Compiled memory of the SFT train step (`steps.lm_loss`) at SmolLM2-135M's shape, per remat mode
and gradient accumulation: the figures behind the SmolLM2 preset's ``Model.remat_policy``.

    PYTHONPATH=$PWD python bench/sft_memory.py [--batch 16] [--length 256] [--remat none,full,matmuls] [--accum 1,4]

Abstract (no weights, `cream_jax.plan.abstract_params`), one device; prints ``compiled.memory_analysis()``'s
argument and temporary bytes. The DPO step's rows come from ``python -m cream_jax.plan --phases train``.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp

from cream_jax import sharding, steps
from cream_jax.config import OptimConfig
from cream_jax.models import presets
from cream_jax.plan import _rows, _scalar, abstract_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--remat", default="none,full,matmuls")
    ap.add_argument("--accum", default="1")
    args = ap.parse_args()
    print(f"load {os.getloadavg()}")
    mesh = sharding.make_mesh(1, 1, 1)
    graphdef, params = abstract_params(presets.preset_config("smollm2_135m"), mesh)
    optimizer = steps.make_optimizer(OptimConfig())
    state = steps.abstract_train_state(params, optimizer)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    batch = {k: _rows(mesh, (args.batch, args.length)) for k in ("input_ids", "attention_mask", "loss_mask")}
    batch["weight"] = _rows(mesh, (args.batch,), jnp.float32)
    batch["lr"] = _scalar(mesh)
    for remat in args.remat.split(","):
        for accum in (int(a) for a in args.accum.split(",")):
            tic = time.perf_counter()
            step = steps.make_train_step(steps.lm_loss, graphdef, optimizer, mesh, state_shardings, accum, remat=remat)
            mem = step.lower(state, batch).compile().memory_analysis()
            print(f"batch {args.batch} x {args.length}  remat {remat:8s} accum {accum}:  "
                  f"args {mem.argument_size_in_bytes / 1e9:.2f} GB  temp {mem.temp_size_in_bytes / 1e9:.2f} GB  "
                  f"(compile {time.perf_counter() - tic:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
