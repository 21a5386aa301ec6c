"""Scanned vs unrolled decode layers in `sampling.generate`: compile seconds and tokens/s, paired in one run.

    PYTHONPATH=$PWD python bench/layers.py --sizes 1m-gqa,10m-gqa,smollm2

Same random weights, prompts and key for both; prints os.getloadavg() beside each row (the
machine is shared: a verdict needs an idle rerun).
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.sampling import SIZES, make_model, prompts
from cream_jax import sampling


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1m-gqa,10m-gqa,smollm2")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--num_samples", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    for size in args.sizes.split(","):
        model, cfg = make_model(SIZES[size])
        ids, mask = prompts(args.batch, 32, cfg.vocab_size)
        kw = dict(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=0.95,
                  eos_id=cfg.vocab_size - 1, pad_id=0)
        row = {}
        for layers in ("unroll", "scan"):
            t = time.perf_counter()
            out = jax.block_until_ready(sampling.generate(model, jnp.asarray(ids), jnp.asarray(mask),
                                                          key=jax.random.key(0), layers=layers, **kw))
            compile_s = time.perf_counter() - t
            best = 0.0
            for rep in range(args.repeats):
                t = time.perf_counter()
                out = jax.block_until_ready(sampling.generate(model, jnp.asarray(ids), jnp.asarray(mask),
                                                              key=jax.random.key(rep + 1), layers=layers, **kw))
                best = max(best, int(np.asarray(out[1]).sum()) / (time.perf_counter() - t))
            row[layers] = (compile_s, best)
            print(f"{size:8s} {layers:6s} first call (compile+run) {compile_s:7.1f} s  {best:8.1f} tok/s  "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
        print(f"{size:8s} scan/unroll tok/s {row['scan'][1] / row['unroll'][1]:.2f}  "
              f"compile {row['scan'][0] / row['unroll'][0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
