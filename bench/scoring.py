"""Tokens/s of ``cream_jax.scoring.sequence_logprobs`` vs a transformers forward + gather.

Usage: ``PYTHONPATH=. python bench/scoring.py [--quick] [--sizes 1m,10m,...] [--hf_dir DIR] [--gguf FILE]
[--batch 64] [--length 256]``

Both score the same batch (prompt + response rows with left and right padding) with the same
weights: cream_jax in one jitted forward, transformers as ``LlamaForCausalLM`` logits followed by
``log_softmax`` + ``gather`` + masked sum under ``torch.no_grad`` (in slices of 16 rows when the
[B,T,V] logits would exceed 2 GB, so that it fits in memory). The two results are checked to
agree (1e-3) before timing. Sizes as in bench/sampling.py (plus ``25m``), the real checkpoints by
``--hf_dir`` / ``--gguf`` (random tokens on real weights). "temp GB" is the compiled scorer's
temporary memory (``compiled.memory_analysis()``): the logits are computed in time chunks. Achieved FLOP/s counts 2 x matmul params per token plus causal attention
and is shown as a fraction of the float32 matmul peak, probed right after each timed call.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.sampling import (SIZES, default_gguf, fastest_torch_threads, make_model, n_params,  # noqa: E402
                            real_checkpoint, summarize, timed)
from cream_jax import scoring  # noqa: E402
from cream_jax.models.hf import save_hf_llama  # noqa: E402

HEADER = "batch {args.batch} x length {args.length} tokens per call"
SCORING_SIZES = {
    **SIZES,
    # ~25M parameters: wider layers, where matmuls dominate the forward.
    "25m": dict(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                num_attention_heads=8, num_key_value_heads=8),
}


def batch(b: int, t: int, vocab: int, seed: int = 0):
    """Rows 'left pad + prompt + response + right pad'; the response is the last half of each row's tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(b, t)).astype(np.int32)
    start = rng.integers(0, t // 8 + 1, size=b)
    end = t - rng.integers(0, t // 8 + 1, size=b)
    pos = np.arange(t)[None]
    mask = ((pos >= start[:, None]) & (pos < end[:, None])).astype(np.int32)
    resp = ((pos >= ((start + end) // 2)[:, None]) & (mask > 0)).astype(np.int32)
    return np.where(mask > 0, ids, 0), mask, resp


def flops(cfg, mask: np.ndarray) -> float:
    _, matmul = n_params(cfg)
    n = mask.sum(1).astype(np.float64)
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim
    return float(np.sum(2 * matmul * n + attn * n * (n + 1) / 2))


def bench_size(size, args):
    import torch
    import transformers
    from flax import nnx

    with tempfile.TemporaryDirectory() as tmp:
        if size in ("hf_dir", "gguf"):
            model, cfg, hf, _ = real_checkpoint(args.hf_dir if size == "hf_dir" else None,
                                                args.gguf if size == "gguf" else None, tmp)
        else:
            model, cfg = make_model(SCORING_SIZES[size])
            save_hf_llama(model, cfg, tmp)
            hf = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    ids, mask, resp = batch(args.batch, args.length, cfg.vocab_size)
    ids_j, mask_j, resp_j = jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(resp)
    graphdef, state = nnx.split(model)
    temp_gb = scoring._scorer(graphdef).lower(state, ids_j, mask_j, resp_j).compile().memory_analysis()
    temp_gb = temp_gb.temp_size_in_bytes / 1e9
    t = time.perf_counter()
    ours, _ = scoring.sequence_logprobs(model, ids_j, mask_j, resp_j)
    ours.block_until_ready()
    compile_s = time.perf_counter() - t
    runs = timed(lambda rep: scoring.sequence_logprobs(model, ids_j, mask_j, resp_j), args.repeats)
    f = flops(cfg, mask)
    achieved, frac, peak = summarize([(f / dt / 1e9, p) for dt, p, _ in runs])

    ids_t, mask_t, resp_t = (torch.tensor(x, dtype=torch.long) for x in (ids, mask, resp))
    pos_t = torch.clamp(torch.cumsum(mask_t, 1) - 1, min=0)
    rows = 16 if args.batch * args.length * cfg.vocab_size * 4 > 2e9 else args.batch

    def hf_score(n=args.batch):
        out = []
        for i in range(0, n, rows):
            sl = slice(i, min(i + rows, n))
            logits = hf(input_ids=ids_t[sl], attention_mask=mask_t[sl], position_ids=pos_t[sl]).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids_t[sl, 1:, None])[..., 0]
            out.append((logp * resp_t[sl, 1:]).sum(1))
        return torch.cat(out)

    with torch.no_grad():
        threads = fastest_torch_threads(lambda: hf_score(min(4, args.batch)))  # a slice picks the thread count
        ref = hf_score()
        np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-3, atol=1e-3)
        hf_best = 1e9
        for _ in range(args.hf_repeats):
            t = time.perf_counter()
            hf_score()
            hf_best = min(hf_best, time.perf_counter() - t)
    tokens = ids.size
    return dict(size=size, params=n_params(cfg)[0], ours=tokens * achieved / (f / 1e9), hf=tokens / hf_best,
                compile=compile_s, gflops=achieved, frac=frac, peak=peak, threads=threads, temp_gb=temp_gb)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1m only, fewer repeats")
    p.add_argument("--sizes", default="1m,10m,1m-gqa,10m-gqa,smollm2", help=f"any of {', '.join(SCORING_SIZES)}")
    p.add_argument("--hf_dir", default=None, help="an HF LLaMA folder: one more row with its weights")
    p.add_argument("--gguf", default=default_gguf(), help="a LLaMA GGUF file: one more row ('none' to skip)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf_repeats", type=int, default=2)
    args = p.parse_args()
    if args.quick:
        args.sizes, args.repeats, args.hf_repeats, args.gguf = "1m", 3, 2, "none"
    sizes = args.sizes.split(",") + ["hf_dir"] * bool(args.hf_dir) + ["gguf"] * (args.gguf not in (None, "none"))
    load_start = os.getloadavg()[0]
    rows = [bench_size(size, args) for size in sizes]
    print(f"devices: {jax.devices()[0].device_kind} x{len(jax.devices())}, cores: {os.cpu_count()}, "
          f"load average (1 min) at the start {load_start:.1f}, at the end {os.getloadavg()[0]:.1f}")
    print(HEADER.format(args=args))
    print("peak = float32 1024^2 matmul GFLOP/s probed after each timed run (max shown); of peak = median of "
          "(useful model FLOP/s / paired probe)")
    print(f"{'size':>5} {'params':>9} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6} {'compile s':>9} "
          f"{'GFLOP/s':>8} {'peak':>6} {'of peak':>7} {'torch thr':>9} {'temp GB':>7}")
    for r in rows:
        print(f"{r['size']:>5} {r['params'] / 1e6:8.2f}M {r['ours']:11.0f} {r['hf']:9.0f} {r['ours'] / r['hf']:6.1f} "
              f"{r['compile']:9.1f} {r['gflops']:8.1f} {r['peak']:6.0f} {r['frac']:7.1%} {r['threads']:9d} {r['temp_gb']:7.2f}")

if __name__ == "__main__":
    main()
