"""cream_jax.scoring against transformers logits and scipy's log-softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import torch

from cream_jax import scoring
from cream_jax.models.hf import load_hf_llama
from tests._tiny_models import save_tiny_llama
from tests.test_llama import hf_logits, mixed_padding_batch


def test_gather_logprobs_matches_scipy_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(3, 9, 50)).astype(np.float32)
    ids = rng.integers(0, 50, size=(3, 9)).astype(np.int32)
    ours = np.asarray(scoring.gather_logprobs(jnp.asarray(logits), jnp.asarray(ids)))
    ref = np.zeros((3, 9))
    logsm = scipy.special.log_softmax(logits.astype(np.float64), axis=-1)
    for b in range(3):
        for j in range(1, 9):
            ref[b, j] = logsm[b, j - 1, ids[b, j]]
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)
    # bf16 logits are upcast before the reduction.
    ours16 = np.asarray(scoring.gather_logprobs(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(ids)))
    assert ours16.dtype == np.float32


def test_response_logprobs_sums_only_response_tokens():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
    ids = rng.integers(0, 11, size=(2, 6)).astype(np.int32)
    rmask = np.array([[1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]], np.int32)
    total, n = scoring.response_logprobs(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(rmask))
    per_tok = np.asarray(scoring.gather_logprobs(jnp.asarray(logits), jnp.asarray(ids)))
    np.testing.assert_allclose(np.asarray(total), [per_tok[0, 2] + per_tok[0, 3], per_tok[1, 4] + per_tok[1, 5]],
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(n), [2, 2])  # column 0 has no prediction: never counted


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_score")
    hf = save_tiny_llama(path, seed=6)
    model, cfg = load_hf_llama(str(path))
    return hf, model, cfg


@pytest.mark.parametrize("chunk", [1, 4, 200])
def test_chunked_response_logprobs_equal_unchunked(tiny, chunk):
    # 200 >= T: one chunk; 4 does not divide the T - 1 = 11 predicting positions: a padded tail.
    _, model, cfg = tiny
    ids, mask = mixed_padding_batch(cfg.vocab_size, seed=3)
    rmask = (np.random.default_rng(4).random(ids.shape) < 0.6).astype(np.int32) * mask
    h, _ = model.hidden_states(jnp.asarray(ids), jnp.asarray(mask))
    total, n = scoring.chunked_response_logprobs(model.logits, h, jnp.asarray(ids), jnp.asarray(rmask), chunk=chunk)
    ref_total, ref_n = scoring.response_logprobs(model.logits(h), jnp.asarray(ids), jnp.asarray(rmask))
    np.testing.assert_allclose(np.asarray(total), np.asarray(ref_total), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(n), np.asarray(ref_n))


def test_chunked_response_logprobs_gradient_equals_unchunked(tiny):
    # The DPO and SFT steps differentiate through the chunked LM head (checkpointed per chunk).
    _, model, cfg = tiny
    ids, mask = mixed_padding_batch(cfg.vocab_size, seed=3)
    rmask = jnp.asarray((np.random.default_rng(4).random(ids.shape) < 0.6).astype(np.int32) * mask)
    h, _ = model.hidden_states(jnp.asarray(ids), jnp.asarray(mask))
    weights = jnp.arange(1, ids.shape[0] + 1, dtype=jnp.float32)  # a non-uniform cotangent per row

    def chunked(h):
        return jnp.sum(scoring.chunked_response_logprobs(model.logits, h, jnp.asarray(ids), rmask, chunk=4)[0] * weights)

    def full(h):
        return jnp.sum(scoring.response_logprobs(model.logits(h), jnp.asarray(ids), rmask)[0] * weights)

    got, want = jax.grad(chunked)(h), jax.grad(full)(h)
    assert float(jnp.max(jnp.abs(want))) > 1e-3  # the gradient is not trivially zero
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_loop_programs_never_hold_the_full_logits(monkeypatch):
    # The score program and the SFT train step with a logits budget of 1/8 of the [B, T, V] float32
    # logits (268 MB): their compiled temporaries stay below what materialising them needs (the
    # train step held 856 MB with the full logits and their gradient).
    from cream_jax import plan, sharding, steps  # noqa: PLC0415
    from cream_jax.config import OptimConfig  # noqa: PLC0415
    from cream_jax.engine import programs  # noqa: PLC0415
    from cream_jax.models.llama import LlamaConfig  # noqa: PLC0415

    mc = LlamaConfig(vocab_size=32768, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    mesh = sharding.make_mesh(1, 1, 1)
    graphdef, params = plan.abstract_params(mc, mesh)
    B, T = 16, 128
    logits_bytes = B * T * mc.vocab_size * 4  # 268 MB
    monkeypatch.setattr(scoring, "LOGITS_CHUNK_BYTES", logits_bytes // 8)
    rows = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))
    score = programs.make_score_program(graphdef, params, mesh).lower(params, rows, rows, rows).compile()
    assert score.memory_analysis().temp_size_in_bytes < logits_bytes / 2
    optimizer = steps.make_optimizer(OptimConfig())
    state = steps.abstract_train_state(params, optimizer)
    step = steps.make_train_step(steps.lm_loss, graphdef, optimizer, mesh, jax.tree.map(lambda x: x.sharding, state))
    batch = {k: rows for k in ("input_ids", "attention_mask", "loss_mask")}
    batch["weight"] = jax.ShapeDtypeStruct((B,), jnp.float32, sharding=sharding.batch_sharding(mesh, 1))
    batch["lr"] = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
    temp = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
    assert temp < logits_bytes, (temp, logits_bytes)  # 135 MB; 856 MB with the full logits


@pytest.mark.parametrize("chunks", ["one", "several"])
def test_sequence_logprobs_match_transformers_and_do_not_retrace(tiny, monkeypatch, chunks):
    hf, model, cfg = tiny
    if chunks == "several":  # a logits budget of 3 time steps: 4 chunks over the 11 positions
        monkeypatch.setattr(scoring, "LOGITS_CHUNK_BYTES", 4 * 3 * len(mixed_padding_batch(cfg.vocab_size)[0])
                            * cfg.vocab_size)
    # Rows: left pad + prompt + response, plus right padding; the response is the tail of the real tokens.
    ids, mask = mixed_padding_batch(cfg.vocab_size, seed=9)
    rmask = np.zeros_like(mask)
    for b in range(len(mask)):
        real = np.flatnonzero(mask[b])
        rmask[b, real[len(real) // 2:]] = 1
    total, n = scoring.sequence_logprobs(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(rmask))
    logp = torch.log_softmax(torch.tensor(hf_logits(hf, ids, mask), dtype=torch.float64), dim=-1).numpy()
    ref = [sum(logp[b, j - 1, ids[b, j]] for j in np.flatnonzero(rmask[b])) for b in range(len(ids))]
    np.testing.assert_allclose(np.asarray(total), ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(n), rmask.sum(1))

    before = scoring.TRACE_COUNTS["sequence_logprobs"]
    scoring.sequence_logprobs(model, jnp.asarray(ids[::-1]), jnp.asarray(mask[::-1]), jnp.asarray(rmask[::-1]))
    assert scoring.TRACE_COUNTS["sequence_logprobs"] == before


def test_shape_errors(tiny):
    _, model, _ = tiny
    ids = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"sequence_logprobs: .* share one \[B,T\] shape"):
        scoring.sequence_logprobs(model, ids, ids[:, :4], ids)
