"""cream_jax.preference on hand examples and against NumPy loops."""

import jax
import numpy as np
import pytest

from cream_jax.preference import (
    DUPLICATE,
    FEW_VALID,
    KEPT,
    TIED,
    UNSELECTED,
    Pairs,
    agreement_mask,
    bootstrap_pairs,
    build_pairs,
    select_by_margin,
    take_pair,
)

_build = jax.jit(build_pairs)


def test_build_pairs_hand_examples():
    nan = np.nan
    rewards = np.array(
        [
            [0.5, 2.0, -1.0, 2.0],  # best = first 2.0 (idx 1), worst idx 2
            [3.0, 3.0, 3.0, 3.0],  # all tied -> dropped
            [1.0, 9.0, 0.0, 5.0],  # idx 1 masked out -> best idx 3, worst idx 2
            [4.0, nan, nan, nan],  # one valid (NaN = no score) -> dropped
            [7.0, -2.0, -2.0, 1.0],  # worst = first -2.0 (idx 1)
        ],
        np.float32,
    )
    mask = np.ones_like(rewards, bool)
    mask[2, 1] = False
    pairs = _build(rewards, mask)
    np.testing.assert_array_equal(np.asarray(pairs.keep), [True, False, True, False, True])
    np.testing.assert_array_equal(np.asarray(pairs.chosen_idx)[[0, 2, 4]], [1, 3, 0])
    np.testing.assert_array_equal(np.asarray(pairs.rejected_idx)[[0, 2, 4]], [2, 2, 1])
    np.testing.assert_allclose(np.asarray(pairs.margin), [3.0, 0.0, 5.0, 0.0, 9.0])
    np.testing.assert_array_equal(np.asarray(pairs.status), [KEPT, TIED, KEPT, FEW_VALID, KEPT])
    counts = {k: int(v) for k, v in pairs.counts().items()}
    assert counts == {
        "pairs/kept": 3,
        "pairs/dropped_few_valid": 1,
        "pairs/dropped_tied": 1,
        "pairs/dropped_duplicate": 0,
        "pairs/dropped_unselected": 0,
    }


def test_build_pairs_matches_numpy_argmax_argmin():
    # Official pair rule (METHODS 2.2 e, 2.7-8): np.argmax / np.argmin, first occurrence.
    rng = np.random.default_rng(0)
    rewards = rng.integers(0, 4, size=(64, 5)).astype(np.float32)  # many ties
    pairs = _build(rewards, np.ones_like(rewards, bool))
    keep = rewards.max(1) > rewards.min(1)
    np.testing.assert_array_equal(np.asarray(pairs.keep), keep)
    np.testing.assert_array_equal(np.asarray(pairs.chosen_idx)[keep], rewards.argmax(1)[keep])
    np.testing.assert_array_equal(np.asarray(pairs.rejected_idx)[keep], rewards.argmin(1)[keep])
    np.testing.assert_allclose(np.asarray(pairs.margin), np.where(keep, rewards.max(1) - rewards.min(1), 0.0))


def test_build_pairs_dedup():
    rewards = np.array(
        [
            [5.0, 3.0, 4.0],  # response 1 is a copy of response 0 -> rejected = 2
            [5.0, 3.0, 4.0],  # no copies -> rejected = 1
            [5.0, 3.0, 4.0],  # all three identical -> DUPLICATE
            [5.0, 3.0, 5.0],  # 1 copies 0; the only distinct one (2) ties with the best -> TIED
        ],
        np.float32,
    )
    a, b, c = [1, 2, 3, 0], [1, 2, 4, 0], [7, 7, 7, 7]
    ids = np.array([[a, a, b], [a, b, c], [a, a, a], [a, a, b]], np.int32)  # [B, R, T]
    pairs = _build(rewards, None, response_ids=ids)
    np.testing.assert_array_equal(np.asarray(pairs.status), [KEPT, KEPT, DUPLICATE, TIED])
    np.testing.assert_array_equal(np.asarray(pairs.rejected_idx)[:2], [2, 1])
    assert int(pairs.counts()["pairs/dropped_duplicate"]) == 1
    # Without dedup the copy is the rejected response (official behaviour).
    np.testing.assert_array_equal(np.asarray(_build(rewards).rejected_idx)[0], 1)


def test_dedup_ignores_padding_contents_under_response_mask():
    rewards = np.array([[2.0, 0.0, 1.0]], np.float32)
    ids = np.array([[[4, 5, 0, 0], [4, 5, 9, 9], [4, 5, 6, 0]]], np.int32)  # 0 and 1 differ only in padding
    rmask = np.array([[[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]], bool)
    pairs = _build(rewards, None, response_ids=ids, response_mask=rmask)
    assert int(pairs.rejected_idx[0]) == 2
    assert int(_build(rewards, None, response_ids=ids).rejected_idx[0]) == 1  # compared position by position


def test_take_pair():
    pairs = Pairs(
        chosen_idx=np.array([2, 0]), rejected_idx=np.array([1, 2]), keep=np.array([True, True]),
        margin=np.zeros(2), status=np.zeros(2, np.int32),
    )
    tokens = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    c, r = take_pair(tokens, pairs)
    np.testing.assert_array_equal(np.asarray(c), tokens[[0, 1], [2, 0]])
    np.testing.assert_array_equal(np.asarray(r), tokens[[0, 1], [1, 2]])
    c, r = take_pair(tokens[..., 0], pairs)
    np.testing.assert_array_equal(np.asarray(c), [8, 12])


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.7, 1.0])
def test_select_by_margin(ratio):
    rng = np.random.default_rng(1)
    margins = rng.normal(size=40).astype(np.float32)
    keep = rng.random(40) < 0.6
    got = np.asarray(jax.jit(select_by_margin, static_argnames="largest")(margins, keep, ratio))
    k = int(np.round(ratio * keep.sum()))
    kept = np.flatnonzero(keep)
    want = np.zeros(40, bool)
    want[kept[np.argsort(-margins[kept], kind="stable")[:k]]] = True
    np.testing.assert_array_equal(got, want)
    smallest = np.asarray(select_by_margin(margins, keep, ratio, largest=False))
    want_small = np.zeros(40, bool)
    want_small[kept[np.argsort(margins[kept], kind="stable")[:k]]] = True
    np.testing.assert_array_equal(smallest, want_small)


def test_select_by_margin_ties_prefer_earlier_pairs():
    got = select_by_margin(np.array([1.0, 2.0, 2.0, 2.0, 0.5]), np.ones(5, bool), 0.4)
    np.testing.assert_array_equal(np.asarray(got), [False, True, True, False, False])


def test_bootstrap_pairs():
    # Two fresh samples per prompt: label by the larger implicit reward, keep the largest gaps.
    rewards = np.array([[0.1, 0.9], [2.0, -3.0], [0.5, 0.5], [1.0, 1.5]], np.float32)
    pairs = bootstrap_pairs(rewards, ratio=0.67)  # 3 labelled pairs (one tie) -> keep round(2.01) = 2
    np.testing.assert_array_equal(np.asarray(pairs.chosen_idx)[[0, 1, 3]], [1, 0, 1])
    np.testing.assert_allclose(np.asarray(pairs.margin), [0.8, 5.0, 0.0, 0.5], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pairs.keep), [True, True, False, False])
    np.testing.assert_array_equal(np.asarray(pairs.status), [KEPT, KEPT, TIED, UNSELECTED])


def test_agreement_mask():
    r1 = np.array([[3.0, 1.0, 2.0], [3.0, 1.0, 2.0], [3.0, 1.0, 2.0], [1.0, 1.0, 1.0]], np.float32)
    r2 = np.array([[0.9, 0.1, 0.5], [0.1, 0.9, 0.5], [0.5, 0.5, 0.0], [1.0, 0.0, 2.0]], np.float32)
    pairs = build_pairs(r1)
    got = jax.jit(agreement_mask)(r1, r2, pairs)
    # agree / reversed / tie under r2 / pair dropped (r1 all tied)
    np.testing.assert_array_equal(np.asarray(got), [True, False, False, False])


def test_bad_input():
    with pytest.raises(ValueError, match="rewards"):
        build_pairs(np.zeros(3))
    with pytest.raises(ValueError, match="mask"):
        build_pairs(np.zeros((2, 3)), np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="response_ids"):
        build_pairs(np.zeros((2, 3)), response_ids=np.zeros((2, 4, 5), np.int32))
    with pytest.raises(ValueError, match="ratio"):
        select_by_margin(np.zeros(3), np.ones(3, bool), 1.5)
    with pytest.raises(ValueError, match="agreement_mask"):
        agreement_mask(np.zeros((2, 3)), np.zeros((2, 4)), build_pairs(np.zeros((2, 3))))


def test_compiles_once():
    traces = []

    def step(rewards, other, mask, ids, ratio):
        traces.append(1)  # runs only while tracing
        pairs = build_pairs(rewards, mask, response_ids=ids)
        boot = bootstrap_pairs(rewards, mask, ratio=ratio)
        return pairs, boot, agreement_mask(rewards, other, pairs), pairs.counts()

    jitted = jax.jit(step)
    rng = np.random.default_rng(2)
    for _ in range(3):
        rewards = rng.normal(size=(8, 4)).astype(np.float32)
        jitted(rewards, -rewards, rng.random((8, 4)) < 0.8, rng.integers(0, 3, (8, 4, 5)), rng.random())
    assert len(traces) == 1
