"""Phase programs with explicit shardings: one ``jax.jit`` per stage, built by a ``make_*`` factory.

Every program takes the model state (``nnx.split(model)[1]``, sharded by its logical names) and a
batch whose leading axis is split over ("data", "fsdp") (`cream_jax.engine.batching`), and returns
outputs split the same way, so per-device work is 1/(data x fsdp) of the global batch. The
factories only need the params' shardings, so abstract params (``jax.ShapeDtypeStruct`` with a
sharding, what `cream_jax.plan` builds) lower and compile the same programs without weights.

Shape letters: B batch, R samples per prompt, M new tokens, T time, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from cream_jax import judge, sampling, scoring, sharding
from cream_jax.models.llama import cast_floating

PyTree = Any


def shardings_of(tree: PyTree) -> PyTree:
    """The sharding of every leaf (arrays or ``ShapeDtypeStruct`` with a sharding)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def _batch(mesh: Mesh, ndim: int, split_rows: bool = True):
    return sharding.batch_sharding(mesh, ndim) if split_rows else sharding.replicated(mesh)


def _traced_on(mesh: Mesh, split_rows: bool, jitted):
    """Traced under the mesh, so the model's activation constraints apply; the replicated
    comparison variant traces without it, as the pre-engine programs did."""
    return sharding.on_mesh(jitted, mesh) if split_rows else jitted


def make_score_program(graphdef: Any, params: PyTree, mesh: Mesh, *, split_rows: bool = True):
    """``score(params, ids [B,T], mask [B,T], response_mask [B,T]) -> (sum_logp [B] f32, n_tokens [B] i32)``:
    `cream_jax.scoring.chunked_response_logprobs` of one forward (no [B,T,V] logits), rows sharded."""

    def score(state, input_ids, attention_mask, response_mask):
        return scoring.model_response_logprobs(nnx.merge(graphdef, state), input_ids, attention_mask, response_mask)

    rows, out = _batch(mesh, 2, split_rows), _batch(mesh, 1, split_rows)
    return _traced_on(mesh, split_rows, jax.jit(score, in_shardings=(shardings_of(params), rows, rows, rows),
                                    out_shardings=(out, out)))


def make_expected_judge_program(graphdef: Any, params: PyTree, mesh: Mesh, *, split_rows: bool = True):
    """``judge(params, ids [B,T], mask [B,T], digit_ids [6]) -> score [B] f32``: the "expected" judge
    read-out (`cream_jax.judge.expected_score`) at the last (left-padded) position; the LM head
    runs on that position only."""

    def read_out(state, input_ids, attention_mask, digit_ids):
        model = nnx.merge(graphdef, state)
        h_btd, _ = model.hidden_states(input_ids, attention_mask)
        return judge.expected_score(model.logits(h_btd[:, -1]), digit_ids)

    rows = _batch(mesh, 2, split_rows)
    return _traced_on(mesh, split_rows, jax.jit(read_out, in_shardings=(shardings_of(params), rows, rows, sharding.replicated(mesh)),
                                    out_shardings=_batch(mesh, 1, split_rows)))


def make_generate_program(graphdef: Any, params: PyTree, mesh: Mesh, *, num_samples: int, max_new_tokens: int,
                          greedy: bool, eos_ids: Sequence[int], pad_id: int, top_k: int = 0, use_top_p: bool = False,
                          layers: str = "unroll", split_rows: bool = True):
    """``generate(params, prompt_ids [B,T], prompt_mask [B,T], key, temperature, top_p) -> (tokens [B,R,M],
    mask [B,R,M])``: `cream_jax.sampling.generate`'s kernel (prefill + KV-cache decode, the R samples
    sharing their prompt's cache) with the prompts, the caches and the outputs split over rows.

    ``temperature`` and ``top_p`` are traced scalars (``temperature`` > 0; it is unused when greedy).
    ``layers``: "unroll" or "scan" decode layers (`cream_jax.sampling.generate`; same tokens).
    ``split_rows=False`` (every factory): the batch replicated on every device instead, the
    pre-engine behaviour, for comparison benchmarks only.
    """
    static = sampling._Static(num_samples, max_new_tokens, greedy, int(top_k), use_top_p,
                              tuple(int(e) for e in eos_ids), int(pad_id), layers)
    kernel = sampling._kernel(graphdef, static)
    rows, one, out = _batch(mesh, 2, split_rows), sharding.replicated(mesh), _batch(mesh, 3, split_rows)
    return _traced_on(mesh, split_rows, jax.jit(kernel, in_shardings=(shardings_of(params), rows, rows, one, one, one),
                                    out_shardings=(out, out)))


def make_cast_params(params: PyTree, dtype: Any):
    """``cast(params) -> params`` in ``dtype`` (floating leaves), each leaf keeping its sharding: the
    compute-dtype copy of a model that is only scored or sampled (M0, M_{t-1}; METHODS section 0)."""
    shardings = shardings_of(params)
    return jax.jit(lambda p: cast_floating(p, jnp.dtype(dtype)), in_shardings=(shardings,), out_shardings=shardings)
