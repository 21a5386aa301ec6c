"""Wall time per phase program on 1 device vs 8 fake devices (data=8), same global work.

Usage: ``PYTHONPATH=. python bench/phase_scaling.py [--quick]``

For each phase (score, judge read-out, greedy sample, DPO train step) the same global batch runs:
  1 dev        the program on a one-device mesh;
  8 repl       8 devices, the batch replicated on each (the pre-engine path: ``curate.batched``
               fed host arrays, so every device computed the whole batch);
  8 split      8 devices, rows split over data=8 (`cream_jax.engine`).
The 8 fake CPU devices share this machine's cores, so "8 split" cannot beat "1 dev" here: what it
shows is that splitting removes the 8x redundant work of "8 repl" (per-device FLOPs from
``cost_analysis`` are printed too). Of peak = all devices' FLOPs / wall / the float32 1024^2 matmul
GFLOP/s probed after each run (bench.sampling.matmul_peak).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.sampling import matmul_peak  # noqa: E402
from cream_jax import sharding, steps  # noqa: E402
from cream_jax.config import OptimConfig  # noqa: E402
from cream_jax.engine import batching, programs  # noqa: E402
from cream_jax.models.llama import Llama, LlamaConfig  # noqa: E402

SHAPE = dict(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)


def flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def rows(b, t, vocab, seed=0):
    rng = np.random.default_rng(seed)
    lens = rng.integers(t // 2, t + 1, size=b)
    mask = (np.arange(t)[None] >= t - lens[:, None]).astype(np.int32)  # left-padded
    ids = np.where(mask > 0, rng.integers(3, vocab, size=(b, t)), 0).astype(np.int32)
    return ids, mask


def time_program(program, args, repeats):
    compiled = program.lower(*args).compile()
    jax.block_until_ready(program(*args))  # warm-up (and the compile cache)
    walls, peaks = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(program(*args))
        walls.append(time.perf_counter() - start)
        peaks.append(matmul_peak())
    return statistics.median(walls), flops(compiled), statistics.median(peaks)


def phase_cases(model, cfg, mesh, split, b, t, m):
    graphdef, state = nnx.split(model)
    state = sharding.shard_params(state, mesh)
    ids, mask = rows(b, t, cfg.vocab_size)
    place = (lambda xs: batching.to_global(xs, mesh)) if split else (
        lambda xs: [jax.device_put(x, sharding.replicated(mesh)) for x in xs])
    resp = mask * (np.arange(t) >= t // 2)
    cases = {
        "score": (programs.make_score_program(graphdef, state, mesh, split_rows=split), (state, *place([ids, mask, resp]))),
        "judge": (programs.make_expected_judge_program(graphdef, state, mesh, split_rows=split),
                  (state, *place([ids, mask]), jnp.arange(10, 16, dtype=jnp.int32))),
        "sample": (programs.make_generate_program(graphdef, state, mesh, num_samples=2, max_new_tokens=m, greedy=True,
                                                  eos_ids=(2,), pad_id=0, split_rows=split),
                   (state, *place([ids[:, -t // 2:], np.ones_like(mask[:, -t // 2:])]), jax.random.key(0),
                    jnp.float32(1.0), jnp.float32(1.0))),
    }
    if split:  # the train step always split its batch
        optimizer = steps.make_optimizer(OptimConfig(learning_rate=1e-4, batch_size=b // 2))
        train_state = steps.init_train_state(state, optimizer, jax.random.key(0))
        step = steps.make_train_step(steps.make_dpo_loss(0.1), graphdef, optimizer, mesh, steps.state_shardings(train_state))
        half = b // 2
        batch = {"chosen_ids": ids[:half], "chosen_mask": mask[:half], "chosen_resp": resp[:half],
                 "rejected_ids": ids[half:], "rejected_mask": mask[half:], "rejected_resp": resp[half:],
                 "ref_chosen": np.full(half, -50.0, np.float32), "ref_rejected": np.full(half, -50.0, np.float32),
                 "consistency": np.ones(half, np.float32), "weight": np.ones(half, np.float32)}
        glob = batching.to_global({**batch, "lr": np.float32(1e-4)}, mesh)

        class Step:  # the step donates its state: feed its output back in
            def __init__(self):
                self.state = train_state

            def lower(self, _state, batch):
                return step.lower(self.state, dict(batch))

            def __call__(self, _state, batch):
                self.state, metrics = step(self.state, dict(batch))
                return metrics

        cases["train"] = (Step(), (None, glob))
    return cases


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    b, t, m, repeats = (16, 64, 8, 2) if args.quick else (32, 128, 16, 3)
    cfg = LlamaConfig(**SHAPE)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    print(f"load before: {os.getloadavg()}; {jax.device_count()} fake CPU devices on {os.cpu_count()} cores; "
          f"model {SHAPE['num_hidden_layers']}x{SHAPE['hidden_size']}, batch {b} rows x {t} tokens, sample {m} tokens x 2")
    variants = {"1 dev": (sharding.single_device_mesh(), True), "8 repl": (sharding.make_mesh(data=8), False),
                "8 split": (sharding.make_mesh(data=8), True)}
    results = {}
    for name, (mesh, split) in variants.items():
        for phase, (program, prog_args) in phase_cases(model, cfg, mesh, split, b, t, m).items():
            results[(phase, name)] = time_program(program, prog_args, repeats)
    print(f"{'phase':<8}{'variant':<9}{'wall ms':>9}{'MFLOP/dev':>11}{'vs 1 dev':>9}{'vs 8 repl':>10}{'of peak':>9}")
    for phase in ("score", "judge", "sample", "train"):
        for name in variants:
            if (phase, name) not in results:
                continue
            wall, fl, peak = results[(phase, name)]
            devices = 1 if name == "1 dev" else 8
            base = results[(phase, "1 dev")][0]
            repl = results.get((phase, "8 repl"), (None,))[0]
            print(f"{phase:<8}{name:<9}{wall * 1e3:9.1f}{fl / 1e6:11.1f}{wall / base:9.2f}"
                  f"{(f'{wall / repl:10.2f}' if repl else '         -')}{fl * devices / wall / (peak * 1e9):9.1%}")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
