"""cream_jax.scoring against transformers logits and scipy's log-softmax."""

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
