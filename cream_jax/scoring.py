"""Per-token and per-sequence log-probabilities of responses under a causal LM.

Shape letters: B batch, T time, C chunks of time, D embed, V vocab.

``logp_theta(y|x) = sum_{t in S(y)} log pi_theta(tok_t | tok_<t)`` (METHODS.md section 1), where the
scored set S(y) is given by ``response_mask``; the length-normalised log-prob is ``sum / n``.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

# Number of times each jitted entry point was traced (tests check that repeated calls do not retrace).
TRACE_COUNTS: collections.Counter = collections.Counter()
_SCORERS: dict[Any, Callable] = {}
# Most bytes of float32 logits one time chunk of the scorer holds at once (see chunked_response_logprobs).
LOGITS_CHUNK_BYTES = 256 * 2**20


def gather_logprobs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """Log-probability of each token given the tokens before it.

    Computed as ``logits[tok] - logsumexp(logits)`` so no full log-softmax copy is kept.

    Args:
      logits: [B,T,V] next-token logits (position j predicts token j+1).
      input_ids: [B,T] int tokens.

    Returns:
      [B,T] float32 where entry j = log p(input_ids[:, j] | input_ids[:, :j]) and entry 0 = 0.
    """
    logits_btv = logits[:, :-1].astype(jnp.float32)
    targets_bt = input_ids[:, 1:]
    picked_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    logp_bt = picked_bt - jax.nn.logsumexp(logits_btv, axis=-1)
    return jnp.pad(logp_bt, ((0, 0), (1, 0)))


def response_logprobs(logits: jax.Array, input_ids: jax.Array, response_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed log-prob of the response tokens of each row (the pure piece, for use inside a jit).

    Args:
      logits: [B,T,V] logits of ``input_ids``.
      input_ids: [B,T] int tokens (prompt + response, any padding).
      response_mask: [B,T], 1 where token j is a response token whose log-prob counts. Column 0
        has no prediction and never counts.

    Returns:
      (sum_logp [B] float32, n_tokens [B] int32).
    """
    mask_bt = response_mask.astype(jnp.float32).at[:, 0].set(0.0)
    logp_bt = gather_logprobs(logits, input_ids)
    return jnp.sum(logp_bt * mask_bt, axis=1), jnp.sum(mask_bt, axis=1).astype(jnp.int32)


def chunked_response_logprobs(logits_fn: Callable[[jax.Array], jax.Array], h_btd: jax.Array, input_ids: jax.Array,
                              response_mask: jax.Array, chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """:func:`response_logprobs` from final hidden states, never holding the whole [B,T,V] logits.

    The T-1 predicting positions are cut into chunks of ``chunk`` steps; ``lax.map`` runs the LM
    head and the logsumexp of one chunk at a time, so at most [B, chunk, V] float32 logits exist
    (64 x 256 tokens at vocab 49k: 3.2 GB of logits, 9.6 GB peak when materialised; Llama-3's
    128k vocabulary would not fit at all). Same sums as the unchunked path up to float rounding.
    Differentiable: the backward pass recomputes one chunk's logits at a time. Every program of the
    loop that needs response log-probs (scoring, the DPO and SFT steps) goes through here.

    Args:
      logits_fn: hidden states [..., D] -> float32 logits [..., V] (``Llama.logits``).
      h_btd: [B,T,D] final hidden states of ``input_ids``.
      input_ids: [B,T] int tokens.
      response_mask: [B,T] as in :func:`response_logprobs` (column 0 never counts).
      chunk: time steps per chunk; default: as many as fit ``LOGITS_CHUNK_BYTES`` of logits.

    Returns:
      (sum_logp [B] float32, n_tokens [B] int32).
    """
    B, T, _ = h_btd.shape
    if chunk is None:
        V = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct((1, h_btd.shape[-1]), h_btd.dtype)).shape[-1]
        chunk = max(1, LOGITS_CHUNK_BYTES // (4 * B * V))
    chunk = min(chunk, T - 1) if T > 1 else 1
    C = math.ceil((T - 1) / chunk)
    if C == 1:  # the logits fit the budget: one plain pass (no map, no recompute in the backward)
        return response_logprobs(logits_fn(h_btd), input_ids, response_mask)
    pad = C * chunk - (T - 1)
    # Position j predicts token j + 1; the padded tail positions have mask 0.
    h_cbtd = jnp.pad(h_btd[:, :-1], ((0, 0), (0, pad), (0, 0))).reshape(B, C, chunk, -1).transpose(1, 0, 2, 3)
    targets_cbt = jnp.pad(input_ids[:, 1:], ((0, 0), (0, pad))).reshape(B, C, chunk).transpose(1, 0, 2)
    mask_bt = jnp.pad(response_mask[:, 1:].astype(jnp.float32), ((0, 0), (0, pad)))

    # Checkpointed so a gradient through the map (the DPO and SFT steps) recomputes each chunk's
    # logits in the backward pass instead of saving all C of them (which is the whole [B,T,V] again).
    @jax.checkpoint
    def chunk_logp(args):
        h_btd, targets_bt = args
        logits_btv = logits_fn(h_btd).astype(jnp.float32)
        picked_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
        return picked_bt - jax.nn.logsumexp(logits_btv, axis=-1)

    logp_bt = jax.lax.map(chunk_logp, (h_cbtd, targets_cbt)).transpose(1, 0, 2).reshape(B, C * chunk)
    return jnp.sum(logp_bt * mask_bt, axis=1), jnp.sum(mask_bt, axis=1).astype(jnp.int32)


def model_response_logprobs(model: Any, input_ids: jax.Array, attention_mask: jax.Array,
                            response_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`chunked_response_logprobs` of ``model``'s forward (``hidden_states`` then ``logits``
    by time chunk), for use inside a jit: what every loop program that scores responses runs."""
    h_btd, _ = model.hidden_states(input_ids, attention_mask)
    return chunked_response_logprobs(model.logits, h_btd, input_ids, response_mask)


def _scorer(graphdef: Any) -> Callable:
    key = (graphdef, LOGITS_CHUNK_BYTES)
    fn = _SCORERS.get(key)
    if fn is None:

        @jax.jit
        def fn(state, input_ids, attention_mask, response_mask):
            TRACE_COUNTS["sequence_logprobs"] += 1
            return model_response_logprobs(nnx.merge(graphdef, state), input_ids, attention_mask, response_mask)

        _SCORERS[key] = fn
    return fn


def sequence_logprobs(model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array,
                      response_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed response log-probs under ``model`` in one jitted forward.

    The LM head runs over time chunks (:func:`chunked_response_logprobs`): the [B,T,V] logits are
    never materialised. Compiled once per (model graph, input shapes and shardings); inputs may be sharded on a mesh.

    Args:
      model: a causal LM with ``hidden_states(input_ids, attention_mask) -> (h [B,T,D], _)`` and
        ``logits(h) -> [..., V]`` (:class:`~cream_jax.models.llama.Llama`).
      input_ids: [B,T] int32 prompt + response tokens.
      attention_mask: [B,T] 1 for real tokens, 0 for padding (left and/or right).
      response_mask: [B,T] 1 for the scored response tokens.

    Returns:
      (sum_logp [B] float32, n_tokens [B] int32); the mean is ``sum_logp / max(n_tokens, 1)``.
    """
    shapes = {jnp.shape(input_ids), jnp.shape(attention_mask), jnp.shape(response_mask)}
    if len(shapes) != 1 or len(jnp.shape(input_ids)) != 2:
        raise ValueError(
            f"sequence_logprobs: input_ids, attention_mask, response_mask must share one [B,T] shape, got "
            f"{jnp.shape(input_ids)}, {jnp.shape(attention_mask)}, {jnp.shape(response_mask)}"
        )
    graphdef, state = nnx.split(model)
    return _scorer(graphdef)(state, input_ids, attention_mask, response_mask)
