"""Batched autoregressive sampling with a KV cache: one jitted prefill + ``lax.while_loop`` decode.

Shape letters: B batch (prompts), R responses per prompt (``num_samples``), T prompt time,
M new tokens (``max_new_tokens``), V vocab.

The prompts are prefilled once and their cache is shared by the R samples of each prompt
(``Llama.decode_step``): only the generated tokens have a per-sample cache. The decode runs in
static segments of ``_SEGMENT`` steps whose generated cache has exactly as many slots as the
segment can fill, so attention never reads slots that are not written yet; every loop stops as
soon as all rows have produced an EOS. Sampling follows transformers' logits processors in the
same order: temperature, then top-k, then top-p (nucleus); ``temperature=0`` is greedy (argmax).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Number of times the generate kernel was traced (tests check that repeated calls do not retrace).
TRACE_COUNTS: collections.Counter = collections.Counter()
_KERNELS: dict[Any, Callable] = {}
# Decode steps per segment (see _kernel): each segment is one compiled copy of the decode step.
_SEGMENT = 16
# Rejection rounds of the top-p draw before the rows still rejected fall back to a full sort.
_TOP_P_ROUNDS = 8


class _Static(NamedTuple):
    """Everything that changes the compiled program apart from input shapes and shardings."""

    num_samples: int
    max_new_tokens: int
    greedy: bool
    top_k: int
    use_top_p: bool
    eos_ids: tuple[int, ...]
    pad_id: int
    # "unroll": L compiled copies of the layer per decode segment, per-layer cache buffers;
    # "scan": one lax.scan over stacked [L, ...] caches (compiles in a fraction of the time at depth).
    layers: str = "unroll"


def _top_p_by_sort(logits_bv: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-p over a full sort of V (the reference rule; see :func:`_in_nucleus`); removed tokens get -inf."""
    # Keep the smallest set of most likely tokens whose mass reaches top_p: a token stays if
    # the mass of the tokens strictly more likely than it is below top_p (so the top one stays).
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    keep_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv < top_p
    cutoff_b1 = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_bv < cutoff_b1, -jnp.inf, logits_bv)


def _filter_logits(logits_bv: jax.Array, temperature: jax.Array, top_p: jax.Array, s: _Static) -> jax.Array:
    """Temperature, top-k and top-p as transformers' warpers apply them; removed tokens get -inf."""
    logits_bv = logits_bv / temperature
    if s.top_k > 0:
        kth_b1 = jax.lax.top_k(logits_bv, s.top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)
    if s.use_top_p:
        logits_bv = _top_p_by_sort(logits_bv, top_p)
    return logits_bv


def _cdf_tables(weights_bv: jax.Array):
    """Block tables of unnormalised weights [B,V] for :func:`_draw` (built once, drawn from many times)."""
    B, V = weights_bv.shape
    b = max(8, 1 << math.ceil(math.log2(math.isqrt(V))))  # block size, a power of two >= sqrt(V)
    nb = -(-V // b)
    w_bnk = jnp.pad(weights_bv, ((0, 0), (0, nb * b - V))).reshape(B, nb, b)
    bsum_bn = jnp.sum(w_bnk, axis=-1)
    return w_bnk, bsum_bn, jnp.cumsum(bsum_bn, axis=-1)


def _draw(tables, key: jax.Array) -> jax.Array:
    """One inverse-CDF draw per row from :func:`_cdf_tables` (zero weights are never drawn)."""
    w_bnk, bsum_bn, bcdf_bn = tables
    B, nb, b = w_bnk.shape
    u_b1 = jax.random.uniform(key, (B, 1), jnp.float32) * bcdf_bn[:, -1:]
    # Item i is drawn iff cdf[i-1] <= u < cdf[i]; the clamps guard float rounding at the top end
    # so that a zero-weight block or token is never returned.
    last_block_b = jnp.max(jnp.where(bsum_bn > 0, jnp.arange(nb), 0), axis=-1)
    block_b = jnp.minimum(jnp.sum(bcdf_bn <= u_b1, axis=-1), last_block_b)
    below_b1 = jnp.take_along_axis(bcdf_bn - bsum_bn, block_b[:, None], axis=-1)
    inner_bk = jnp.take_along_axis(w_bnk, block_b[:, None, None], axis=1)[:, 0]
    last_token_b = jnp.max(jnp.where(inner_bk > 0, jnp.arange(b), 0), axis=-1)
    token_b = jnp.minimum(jnp.sum(jnp.cumsum(inner_bk, axis=-1) <= u_b1 - below_b1, axis=-1), last_token_b)
    return (block_b * b + token_b).astype(jnp.int32)


def _sample(weights_bv: jax.Array, key: jax.Array) -> jax.Array:
    """One draw per row from unnormalised weights [B,V] (zeros are never drawn): inverse CDF, two-level.

    One uniform per row picks a block of ~sqrt(V) tokens from the block sums, then a token inside
    the block. ``jax.random.categorical`` draws V Gumbel variates per row and a flat cumsum is
    O(V * window) on CPU; at V = 512 this is 4-18x faster, at V = 32000 5-20x (bench/README.md).
    """
    return _draw(_cdf_tables(weights_bv), key)


def _mass_above(logits_bv: jax.Array, weights_bv: jax.Array, token_b: jax.Array) -> jax.Array:
    """[B] unnormalised mass of the tokens strictly more likely than ``token_b`` (one pass over V)."""
    logit_b1 = jnp.take_along_axis(logits_bv, token_b[:, None], axis=-1)
    return jnp.sum(jnp.where(logits_bv > logit_b1, weights_bv, 0.0), axis=-1)


def _in_nucleus(logits_bv: jax.Array, weights_bv: jax.Array, token_b: jax.Array, top_p: jax.Array) -> jax.Array:
    """[B] bool: ``token_b`` survives top-p, i.e. the mass strictly more likely than it is below top_p.

    The same rule as the full sort in :func:`_filter_logits` (and transformers' TopPLogitsWarper):
    the tokens kept are the smallest most-likely set whose mass reaches top_p, ties at the cut kept.
    """
    return _mass_above(logits_bv, weights_bv, token_b) < top_p * jnp.sum(weights_bv, axis=-1)


def _sample_top_p(logits_bv: jax.Array, key: jax.Array, top_p: jax.Array) -> jax.Array:
    """One draw per row from softmax(logits) restricted to its top-p nucleus, without sorting V.

    Rejection sampling: draw from the whole distribution and accept the token iff it is in the
    nucleus (:func:`_in_nucleus`, one pass over V); rejected rows draw again. An accepted draw is
    distributed exactly as the renormalised nucleus, and the nucleus holds mass >= top_p, so each
    round accepts with probability >= top_p whatever the distribution (a sort of 64 x 49k logits
    took 0.8-1.3 s per step on this CPU; a round takes a few ms). Rows still rejected after
    ``_TOP_P_ROUNDS`` rounds (likely only for small top_p) draw from the full-sort filter.
    """
    weights_bv = jnp.exp(logits_bv - jnp.max(logits_bv, axis=-1, keepdims=True))
    tables = _cdf_tables(weights_bv)
    bound_b = top_p * jnp.sum(weights_bv, axis=-1)

    def body(carry):
        i, token_b, need_b = carry
        cand_b = _draw(tables, jax.random.fold_in(key, i))
        ok_b = _mass_above(logits_bv, weights_bv, cand_b) < bound_b
        return i + 1, jnp.where(need_b & ok_b, cand_b, token_b), need_b & ~ok_b

    B = logits_bv.shape[0]
    start = (jnp.int32(0), jnp.zeros((B,), jnp.int32), jnp.ones((B,), bool))
    _, token_b, need_b = jax.lax.while_loop(lambda c: (c[0] < _TOP_P_ROUNDS) & jnp.any(c[2]), body, start)

    def sorted_draw():
        kept_bv = _top_p_by_sort(logits_bv, top_p)
        drawn_b = _sample(jnp.exp(kept_bv - jnp.max(kept_bv, axis=-1, keepdims=True)),
                          jax.random.fold_in(key, _TOP_P_ROUNDS))
        return jnp.where(need_b, drawn_b, token_b)

    return jax.lax.cond(jnp.any(need_b), sorted_draw, lambda: token_b)


def _next_token(logits_bv, key, temperature, top_p, s: _Static) -> jax.Array:
    """Greedy argmax, or one draw per row from softmax(filtered logits)."""
    if s.greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = _filter_logits(logits_bv, temperature, top_p, s._replace(use_top_p=False))
    if s.use_top_p:
        return _sample_top_p(logits_bv, key, top_p)
    return _sample(jnp.exp(logits_bv - jnp.max(logits_bv, axis=-1, keepdims=True)), key)  # filtered -> 0


def _segment_ends(max_new_tokens: int) -> list[int]:
    """Exclusive last decode step of each decode segment (steps 1 .. M-1; step 0 comes from the prefill)."""
    return list(range(1 + _SEGMENT, max_new_tokens, _SEGMENT)) + [max_new_tokens] if max_new_tokens > 1 else []


def _kernel(graphdef: Any, s: _Static) -> Callable:
    key_ = (graphdef, s, _SEGMENT)
    if key_ in _KERNELS:
        return _KERNELS[key_]

    @jax.jit
    def run(state, prompt_ids, prompt_mask, key, temperature, top_p):
        TRACE_COUNTS["generate"] += 1
        model = nnx.merge(graphdef, state)
        B, T = prompt_ids.shape
        R, M = s.num_samples, s.max_new_tokens
        eos = jnp.asarray(s.eos_ids, jnp.int32)

        prefix = model.init_cache(B, T)
        h_btd, prefix = model.hidden_states(prompt_ids, prompt_mask, cache=prefix)
        # Prompts are left-padded: the last slot is real. Each prompt's R samples share its cache.
        logits_bv = jnp.repeat(model.logits(h_btd[:, -1]), R, axis=0)  # [B*R, V], row b*R + i

        tok_b = _next_token(logits_bv, jax.random.fold_in(key, 0), temperature, top_p, s)
        tokens_bm = jnp.full((B * R, M), s.pad_id, jnp.int32).at[:, 0].set(tok_b)
        mask_bm = jnp.zeros((B * R, M), jnp.int32).at[:, 0].set(1)
        done_b = jnp.any(tok_b[:, None] == eos, axis=-1)

        def cond(end):
            return lambda carry: (carry[0] < end) & ~jnp.all(carry[-1])

        def body(carry):
            step, gen, tok_b, tokens_bm, mask_bm, done_b = carry
            # Token `step - 1` goes into generated slot step - 1 and predicts token `step`.
            h_bd, gen = model.decode_step(tok_b, prefix, gen, step - 1, layers)
            new_b = _next_token(model.logits(h_bd, head), jax.random.fold_in(key, step), temperature, top_p, s)
            # Rows that already emitted EOS keep emitting pad with mask 0.
            new_b = jnp.where(done_b, s.pad_id, new_b)
            tokens_bm = jax.lax.dynamic_update_index_in_dim(tokens_bm, new_b, step, axis=1)
            mask_bm = jax.lax.dynamic_update_index_in_dim(mask_bm, (~done_b).astype(jnp.int32), step, axis=1)
            done_b = done_b | jnp.any(new_b[:, None] == eos, axis=-1)
            return step + 1, gen, new_b, tokens_bm, mask_bm, done_b

        # Decode in segments: segment j runs steps up to ends[j] with a cache of exactly ends[j] - 1
        # generated slots, so attention never reads slots that later segments will fill. The cache
        # grows (one copy) between segments; all loops exit at once when every row has ended.
        gen = model.init_gen_cache(B * R, 0)
        if s.layers == "scan":
            prefix = prefix._replace(k=jnp.stack(prefix.k), v=jnp.stack(prefix.v))
            gen = gen._replace(k=jnp.stack(gen.k), v=jnp.stack(gen.v))
            layers = model.stack_layers()
            pad_time = lambda n: ((0, 0), (0, 0), (0, 0), (0, n), (0, 0))  # noqa: E731  [L,R,K,S,H]
        else:
            layers = model.unstack_layers()  # weights sliced once, not every step
            pad_time = lambda n: ((0, 0), (0, 0), (0, n), (0, 0))  # noqa: E731  [R,K,S,H]
        # Scanned layers: the LM head gathered once for all segments (otherwise XLA keeps one gathered
        # copy per segment: 144 instead of 45 GB of temporaries per device for the 8B preset on 8
        # devices, `cream_jax.plan`). The unrolled program makes no such copies, and one more whole
        # head costs it memory (1.6 GB at one 8B layer).
        head = model.head_weights() if s.layers == "scan" else None
        carry = (jnp.int32(1), gen, tok_b, tokens_bm, mask_bm, done_b)
        for end in _segment_ends(M):
            grow = lambda x: jnp.pad(x, pad_time(end - 1 - x.shape[-2]))  # noqa: E731
            carry = carry[:1] + (jax.tree.map(grow, carry[1]),) + carry[2:]
            carry = jax.lax.while_loop(cond(end), body, carry)
        _, _, _, tokens_bm, mask_bm, _ = carry
        return tokens_bm.reshape(B, R, M), mask_bm.reshape(B, R, M)

    _KERNELS[key_] = run
    return run


def generate(model: nnx.Module, prompt_ids: jax.Array, prompt_mask: jax.Array, *, key: jax.Array,
             num_samples: int = 1, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, eos_id: int | Sequence[int], pad_id: int,
             layers: str = "unroll") -> tuple[jax.Array, jax.Array]:
    """Samples ``num_samples`` continuations of each left-padded prompt.

    Compiled once per (model graph, shapes, num_samples, max_new_tokens, greedy or not, top_k,
    top-p on or off, eos ids, pad id); temperature and top_p values are traced, so changing them
    does not recompile. Works with parameters and prompts sharded on a mesh (jit follows them).

    Args:
      model: a :class:`~cream_jax.models.llama.Llama` (anything with its cache API).
      prompt_ids: [B,T] int32 prompts, left-padded.
      prompt_mask: [B,T] 1 for real prompt tokens, 0 for (left) padding; the last column must be 1.
      key: PRNG key; the same key gives the same samples.
      num_samples: R responses per prompt.
      max_new_tokens: M tokens generated at most.
      temperature: softmax temperature; 0 means greedy decoding.
      top_p: nucleus mass in (0, 1]; 1 disables it.
      top_k: keep the k most likely tokens; 0 disables it.
      eos_id: one EOS id or several; generation of a row ends after its first EOS.
      pad_id: filler for positions after EOS.
      layers: "unroll" (per-layer caches, L copies of the layer in the program) or "scan" (one
        ``lax.scan`` over stacked caches: same tokens, far shorter compile for deep models).

    Returns:
      (tokens [B,R,M] int32, mask [B,R,M] int32): mask is 1 for generated tokens up to and
      including the first EOS; later tokens are ``pad_id`` with mask 0.
    """
    eos_ids = (int(eos_id),) if np.ndim(eos_id) == 0 else tuple(int(e) for e in eos_id)
    if jnp.ndim(prompt_ids) != 2 or jnp.shape(prompt_mask) != jnp.shape(prompt_ids):
        raise ValueError(f"generate: prompt_ids and prompt_mask must both be [B,T], got "
                         f"{jnp.shape(prompt_ids)} and {jnp.shape(prompt_mask)}")
    if not jnp.issubdtype(jnp.result_type(prompt_ids), jnp.integer):
        raise ValueError(f"generate: prompt_ids must be integer token ids, got {jnp.result_type(prompt_ids)}")
    checks = [
        (max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {max_new_tokens}"),
        (num_samples >= 1, f"num_samples must be >= 1, got {num_samples}"),
        (temperature >= 0, f"temperature must be >= 0, got {temperature}"),
        (0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
        (top_k >= 0, f"top_k must be >= 0, got {top_k}"),
        (len(eos_ids) > 0, "eos_id must name at least one token"),
        (layers in ("unroll", "scan"), f"layers must be 'unroll' or 'scan', got {layers!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"generate: {message}")
    # A multi-process global mask cannot be read on one host: reduce it on the mesh (replicated result).
    last = prompt_mask[:, -1]
    if not (np.all(np.asarray(last)) if getattr(last, "is_fully_addressable", True) else bool(jnp.all(last))):
        raise ValueError("generate: prompt_mask must be left-padded (its last column all 1)")
    static = _Static(num_samples, max_new_tokens, temperature == 0, int(top_k), top_p < 1.0, eos_ids, int(pad_id),
                     layers)
    graphdef, state = nnx.split(model)
    return _kernel(graphdef, static)(state, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32),
                                     key, jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p))
