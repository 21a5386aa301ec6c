"""Per-token and per-sequence log-probabilities of responses under a causal LM.

Shape letters: B batch, T time, V vocab.

``logp_theta(y|x) = sum_{t in S(y)} log pi_theta(tok_t | tok_<t)`` (METHODS.md section 1), where the
scored set S(y) is given by ``response_mask``; the length-normalised log-prob is ``sum / n``.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

# Number of times each jitted entry point was traced (tests check that repeated calls do not retrace).
TRACE_COUNTS: collections.Counter = collections.Counter()
_SCORERS: dict[Any, Callable] = {}


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


def _scorer(graphdef: Any) -> Callable:
    fn = _SCORERS.get(graphdef)
    if fn is None:

        @jax.jit
        def fn(state, input_ids, attention_mask, response_mask):
            TRACE_COUNTS["sequence_logprobs"] += 1
            logits_btv = nnx.merge(graphdef, state)(input_ids, attention_mask)
            return response_logprobs(logits_btv, input_ids, response_mask)

        _SCORERS[graphdef] = fn
    return fn


def sequence_logprobs(model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array,
                      response_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed response log-probs under ``model`` in one jitted forward.

    Compiled once per (model graph, input shapes and shardings); inputs may be sharded on a mesh.

    Args:
      model: a causal LM called as ``model(input_ids, attention_mask) -> logits [B,T,V]``.
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
