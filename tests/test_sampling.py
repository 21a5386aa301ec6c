"""cream_jax.sampling.generate: transformers greedy parity, sampling distribution, invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from cream_jax import sampling
from cream_jax.models.hf import load_hf_llama
from cream_jax.models.llama import LlamaConfig
from tests._tiny_models import TINY_LLAMA, random_batch, random_llama, save_tiny_llama
from tests.test_llama import forward

M = 12  # max_new_tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gen")
    hf = save_tiny_llama(path, seed=5)
    model, cfg = load_hf_llama(str(path))
    ids, mask = random_batch(4, 7, cfg.vocab_size, seed=11, left_pad=True, min_len=2)
    return hf, model, cfg, ids, mask


def hf_greedy(hf, ids, mask, eos):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                          max_new_tokens=M, do_sample=False, eos_token_id=eos, pad_token_id=0)
    out = out[:, ids.shape[1]:].numpy()
    return np.pad(out, ((0, 0), (0, M - out.shape[1])), constant_values=0)


@pytest.mark.parametrize("layers", ["unroll", "scan"])
def test_greedy_equals_transformers_with_left_padding_and_eos(tiny, layers):
    hf, model, cfg, ids, mask = tiny
    free = hf_greedy(hf, ids, mask, eos=[127])  # an EOS that (we check) never comes: full length
    assert (free != 127).all()
    # An EOS the rows reach at different steps, including one that some rows never reach.
    eos = [int(free[0, 3]), int(free[2, 8])]
    ref = hf_greedy(hf, ids, mask, eos=eos)
    tokens, out_mask = sampling.generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=M,
                                         temperature=0.0, eos_id=eos, pad_id=0, layers=layers)
    tokens, out_mask = np.asarray(tokens)[:, 0], np.asarray(out_mask)[:, 0]
    np.testing.assert_array_equal(tokens, ref)
    ended = np.isin(ref, eos)
    assert ended[0].any() and ended[2].any()
    for row, m in zip(ref, out_mask):  # mask = 1 through the first EOS, 0 after
        stop = np.flatnonzero(np.isin(row, eos))
        n = stop[0] + 1 if len(stop) else M
        np.testing.assert_array_equal(m, (np.arange(M) < n).astype(np.int32))


# One set of static arguments for the invariant tests, so they share compiled kernels.
KW = dict(num_samples=2, max_new_tokens=M, eos_id=(5, 9, 17), pad_id=3)


def test_shapes_eos_masking_and_num_samples(tiny):
    _, model, cfg, ids, mask = tiny
    tokens, out_mask = sampling.generate(model, ids, mask, key=jax.random.key(1), temperature=1.5, **KW)
    assert tokens.shape == out_mask.shape == (4, 2, M) and tokens.dtype == out_mask.dtype == jnp.int32
    tokens, out_mask = np.asarray(tokens).reshape(-1, M), np.asarray(out_mask).reshape(-1, M)
    for row, m in zip(tokens, out_mask):
        stop = np.flatnonzero(np.isin(row, KW["eos_id"]))
        n = stop[0] + 1 if len(stop) else M
        np.testing.assert_array_equal(m, (np.arange(M) < n).astype(np.int32))
        assert (row[n:] == KW["pad_id"]).all()
    assert (out_mask.sum(1) < M).any()  # at a high temperature some rows do hit an EOS
    # Greedy samples of one prompt are all the same.
    g, _ = sampling.generate(model, ids, mask, key=jax.random.key(1), temperature=0.0, **KW)
    np.testing.assert_array_equal(np.asarray(g)[:, 0], np.asarray(g)[:, 1])


def test_top_k1_is_greedy_and_keys_determine_samples(tiny):
    _, model, cfg, ids, mask = tiny
    greedy, _ = sampling.generate(model, ids, mask, key=jax.random.key(0), temperature=0.0, **KW)
    top1, _ = sampling.generate(model, ids, mask, key=jax.random.key(7), temperature=1.0, top_k=1, **KW)
    np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))
    a, _ = sampling.generate(model, ids, mask, key=jax.random.key(3), temperature=1.0, **KW)
    b, _ = sampling.generate(model, ids, mask, key=jax.random.key(3), temperature=1.0, **KW)
    c, _ = sampling.generate(model, ids, mask, key=jax.random.key(4), temperature=1.0, **KW)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (np.asarray(a) != np.asarray(c)).any()
    assert (np.asarray(a)[:, 0] != np.asarray(a)[:, 1]).any()  # the samples of a prompt differ


def test_second_call_does_not_retrace(tiny):
    _, model, cfg, ids, mask = tiny
    sampling.generate(model, ids, mask, key=jax.random.key(0), temperature=1.0, **KW)
    before = sampling.TRACE_COUNTS["generate"]
    sampling.generate(model, ids + 1, mask, key=jax.random.key(1), temperature=0.7, **KW)
    assert sampling.TRACE_COUNTS["generate"] == before


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.3, 20, 1.0), (1.0, 0, 0.8), (0.9, 50, 0.9)])
def test_filters_match_transformers_warpers(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(0, 3, size=(6, 128)).astype(np.float32)
    s = sampling._Static(1, 1, False, top_k, top_p < 1.0, (2,), 0)
    ours = np.asarray(sampling._filter_logits(jnp.asarray(logits), jnp.float32(temperature), jnp.float32(top_p), s))
    ref = torch.tensor(logits)
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    for w in warpers:
        ref = w(None, ref)
    ref = ref.numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    kept = ~np.isinf(ref)
    assert (kept.sum(1) < 128).all() or (top_k == 0 and top_p == 1.0)
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-5, atol=1e-5)


def test_two_level_sampler_matches_weights():
    rng = np.random.default_rng(0)
    w = rng.random(100) ** 2  # V = 100 is not a multiple of the block size: padding is exercised
    w[[0, 15, 16, 37, 99]] = 0.0  # zero weights at block edges and at both ends are never drawn
    keys = jax.random.split(jax.random.key(9), 20000)
    draws = jax.jit(jax.vmap(lambda k: sampling._sample(jnp.asarray(w, jnp.float32)[None], k)[0]))(keys)
    counts = np.bincount(np.asarray(draws), minlength=100)
    assert counts[w == 0].sum() == 0
    assert _chi2_pvalue(counts, w / w.sum()) > 1e-3
    one_hot = jnp.zeros((3, 16)).at[:, 11].set(2.0)
    np.testing.assert_array_equal(np.asarray(sampling._sample(one_hot, jax.random.key(0))), [11, 11, 11])


def _chi2_pvalue(counts, probs):
    """Pearson chi-square p-value, pooling bins expected below 5 so the test is valid."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return scipy.stats.chisquare(obs[keep], exp[keep]).pvalue


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.5, 6, 1.0), (0.7, 0, 0.6), (0.8, 10, 0.9)])
def test_first_token_distribution_matches_filtered_softmax(temperature, top_k, top_p):
    cfg = LlamaConfig(**{**TINY_LLAMA, "vocab_size": 16})
    model = random_llama(cfg, seed=3, std=0.1)
    ids, mask = np.array([[0, 0, 4, 7, 9]], np.int32), np.array([[0, 0, 1, 1, 1]], np.int32)
    logits = np.asarray(forward(model, ids, mask))[0, -1].astype(np.float64)
    toks, _ = sampling.generate(model, ids, mask, key=jax.random.key(42), num_samples=4000, max_new_tokens=1,
                                temperature=temperature, top_k=top_k, top_p=top_p, eos_id=15, pad_id=0)
    counts = np.bincount(np.asarray(toks).ravel(), minlength=16)
    z = _reference_filter(logits[None], temperature, top_k, top_p)[0]
    assert counts[np.isinf(z)].sum() == 0 and np.isinf(z).any()
    probs = np.exp(z - z.max())
    assert _chi2_pvalue(counts, probs / probs.sum()) > 1e-3
    # Power checks: without the temperature, or without the filters, the counts are rejected.
    for wrong in (np.where(np.isinf(z), -np.inf, logits), logits / temperature):
        p = np.exp(wrong - wrong.max())
        assert _chi2_pvalue(counts, p / p.sum()) < 1e-3


def _reference_filter(logits, temperature, top_k, top_p):
    """Temperature, top-k, then top-p by a full float64 sort of each row (the rule transformers applies)."""
    z = logits.astype(np.float64) / temperature
    if top_k:
        z = np.where(z < np.sort(z, axis=-1)[:, -top_k:][:, :1], -np.inf, z)
    for row in z:
        order = np.argsort(-row, kind="stable")
        p = np.exp(row[order] - row[order[0]])
        p /= p.sum()
        above = np.cumsum(p) - p  # mass strictly more likely (first of a tied group: exactly that)
        cutoff = row[order][above < top_p].min()
        row[row < cutoff] = -np.inf
    return z


@pytest.mark.parametrize("scale, top_p", [(0.3, 0.95), (4.0, 0.95), (2.0, 0.5), (1.0, 0.999)])
def test_nucleus_membership_equals_full_sort(scale, top_p):
    # Flat (nucleus ~ the whole vocabulary) and peaked rows; ties at the cut are kept.
    rng = np.random.default_rng(int(scale * 10))
    logits = (rng.normal(0, scale, size=(8, 300))).astype(np.float32)
    logits[:, 50:60] = logits[:, 50:51]  # a tied group
    ref_kept = ~np.isinf(_reference_filter(logits, 1.0, 0, top_p))
    sort_kept = ~np.isinf(np.asarray(sampling._top_p_by_sort(jnp.asarray(logits), jnp.float32(top_p))))
    np.testing.assert_array_equal(sort_kept, ref_kept)
    lj = jnp.asarray(logits)
    w = jnp.exp(lj - jnp.max(lj, axis=-1, keepdims=True))
    member = jax.vmap(lambda t: sampling._in_nucleus(lj, w, jnp.full((8,), t, jnp.int32), jnp.float32(top_p)),
                      out_axes=1)(jnp.arange(300))
    np.testing.assert_array_equal(np.asarray(member), ref_kept)
    assert 1 < ref_kept.sum(1).min() and ref_kept.sum(1).max() < 300


@pytest.mark.parametrize("rounds", [8, 0])
def test_top_p_rejection_draw_matches_nucleus(monkeypatch, rounds):
    # rounds=0: every row takes the full-sort fallback; 8: rejection (a flat row accepts ~top_p).
    monkeypatch.setattr(sampling, "_TOP_P_ROUNDS", rounds)
    rng = np.random.default_rng(5)
    logits = np.stack([rng.normal(0, 0.3, 40), rng.normal(0, 1.5, 40)]).astype(np.float32)
    top_p = 0.7
    keys = jax.random.split(jax.random.key(rounds), 6000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sampling._sample_top_p(jnp.asarray(logits), k, jnp.float32(top_p))))(keys))
    z = _reference_filter(logits, 1.0, 0, top_p)
    assert 3 < (~np.isinf(z)).sum(1).min() and (~np.isinf(z)).sum(1).max() < 40
    for row in range(2):
        counts = np.bincount(draws[:, row], minlength=40)
        assert counts[np.isinf(z[row])].sum() == 0
        p = np.exp(z[row] - z[row].max())
        assert _chi2_pvalue(counts, p / p.sum()) > 1e-3
    # Same key, same draws.
    again = jax.jit(lambda k: sampling._sample_top_p(jnp.asarray(logits), k, jnp.float32(top_p)))(keys[0])
    np.testing.assert_array_equal(np.asarray(again), draws[0])


def test_bad_arguments(tiny):
    _, model, cfg, ids, mask = tiny
    kw = dict(key=jax.random.key(0), max_new_tokens=4, eos_id=2, pad_id=0)
    for bad, message in [(dict(top_p=0.0), "top_p"), (dict(temperature=-1.0), "temperature"),
                         (dict(top_k=-1), "top_k"), (dict(num_samples=0), "num_samples"),
                         (dict(max_new_tokens=0), "max_new_tokens"), (dict(eos_id=[]), "eos_id"),
                         (dict(layers="scanned"), "layers")]:
        with pytest.raises(ValueError, match=f"generate: {message}"):
            sampling.generate(model, ids, mask, **{**kw, **bad})
    right = mask[:, ::-1].copy()
    with pytest.raises(ValueError, match="left-padded"):
        sampling.generate(model, ids, right, **kw)
    with pytest.raises(ValueError, match=r"must both be \[B,T\]"):
        sampling.generate(model, ids, mask[:, :3], **kw)


def _reference_generate(model, ids, mask, key, num_samples, temperature, eos, pad_id):
    """The unshared path: each prompt repeated R times in one KVCache of T + M slots, M decode calls.

    Same random draws as ``generate`` (``fold_in(key, step)`` over the B*R rows), no early exit.
    """
    s = sampling._Static(num_samples, M, temperature == 0, 0, False, tuple(eos), pad_id)
    ids_r, mask_r = np.repeat(ids, num_samples, 0), np.repeat(mask, num_samples, 0)
    cache = model.init_cache(len(ids_r), ids.shape[1] + M)
    logits, cache = forward(model, ids_r, mask_r, cache)
    draw = lambda lg, step: sampling._next_token(lg, jax.random.fold_in(key, step), jnp.float32(max(temperature, 1e-6)),  # noqa: E731
                                                 jnp.float32(1.0), s)
    toks = [draw(logits[:, -1], 0)]
    for step in range(1, M):
        logits, cache = forward(model, np.asarray(toks[-1])[:, None], np.ones((len(ids_r), 1), np.int32), cache)
        toks.append(draw(logits[:, 0], step))
    toks = np.stack([np.asarray(t) for t in toks], 1)
    ended = np.cumsum(np.isin(toks, eos), 1) - np.isin(toks, eos) > 0  # after the first EOS
    return np.where(ended, pad_id, toks).reshape(len(ids), num_samples, M), (~ended).astype(np.int32)


@pytest.mark.parametrize("segment, layers", [(4, "unroll"), (16, "unroll"), (4, "scan")])
def test_shared_prompt_cache_and_segments_equal_unshared_decoding(tiny, monkeypatch, segment, layers):
    # Prompts of different lengths (left padding), 3 samples each, GQA, EOS ids some rows hit
    # early; segment 4 splits the 11 decode steps into 3 segments, 16 keeps one.
    _, model, cfg, ids, mask = tiny
    monkeypatch.setattr(sampling, "_SEGMENT", segment)
    key, eos = jax.random.key(21), (5, 9, 17, 40)
    ref_tokens, ref_mask = _reference_generate(model, ids, mask, key, 3, 1.0, eos, pad_id=3)
    tokens, out_mask = sampling.generate(model, ids, mask, key=key, num_samples=3, max_new_tokens=M,
                                         temperature=1.0, eos_id=eos, pad_id=3, layers=layers)
    np.testing.assert_array_equal(np.asarray(tokens), ref_tokens)
    np.testing.assert_array_equal(np.asarray(out_mask).reshape(-1, M), ref_mask)
    assert 0 < ref_mask.sum() < ref_mask.size  # some rows ended early, some did not


def test_scanned_layers_draw_the_same_samples_as_unrolled(tiny):
    # Same key, top-p on: the scanned decode (stacked caches, one lax.scan) must give the
    # unrolled path's tokens, so switching `layers` never changes a run's samples.
    _, model, cfg, ids, mask = tiny
    kw = dict(key=jax.random.key(8), temperature=1.0, top_p=0.9, **KW)
    a, am = sampling.generate(model, ids, mask, layers="unroll", **kw)
    b, bm = sampling.generate(model, ids, mask, layers="scan", **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(am), np.asarray(bm))


def test_early_exit_when_every_row_ended(tiny, monkeypatch):
    # Every token is an EOS: all rows end at step 0 and the decode loops run no step.
    _, model, cfg, ids, mask = tiny
    monkeypatch.setattr(sampling, "_SEGMENT", 4)
    tokens, out_mask = sampling.generate(model, ids, mask, key=jax.random.key(0), num_samples=2, max_new_tokens=M,
                                         temperature=1.0, eos_id=tuple(range(cfg.vocab_size)), pad_id=3)
    np.testing.assert_array_equal(np.asarray(out_mask).sum(-1), 1)
    assert (np.asarray(tokens)[..., 1:] == 3).all()
    assert sampling._segment_ends(M) == [5, 9, M] and sampling._segment_ends(1) == []
