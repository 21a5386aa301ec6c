"""cream_jax.rewards: reward formulas, host oracle, accuracy against an oracle."""

import itertools

import jax
import numpy as np
import pytest

from cream_jax.preference import build_pairs
from cream_jax.rewards import ensemble, implicit, likelihood, oracle, pairwise_accuracy, reward_accuracy


def test_implicit_and_likelihood():
    rng = np.random.default_rng(0)
    lp, lr = (rng.normal(-30, 5, (3, 4)).astype(np.float32) for _ in range(2))
    want = lp.astype(np.float64) - lr
    np.testing.assert_allclose(np.asarray(implicit(lp, lr)), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(implicit(lp, lr, beta=0.1)), 0.1 * want, atol=1e-5, rtol=0)
    n = np.array([[3, 5, 1, 0]] * 3)
    got = np.asarray(likelihood(lp, n))
    np.testing.assert_allclose(got[:, :3], lp[:, :3] / n[:, :3], atol=1e-5, rtol=0)
    assert np.isnan(got[:, 3]).all()  # no scored tokens: no score


def test_ensemble():
    a, b = np.ones((2, 3)), np.arange(6.0).reshape(2, 3)
    np.testing.assert_allclose(np.asarray(ensemble([a, b], [0.25, 0.75])), 0.25 * a + 0.75 * b)
    np.testing.assert_allclose(np.asarray(ensemble([a, b])), (a + b) / 2)


def test_oracle_calls_verifier_on_host():
    def verifier(prompt, response):
        if response == "?":
            return None
        return float(response == prompt["answer"])

    prompts = [{"answer": "4"}, {"answer": "7"}]
    got = oracle(verifier, prompts, [["4", "5", "?"], ["7", "7", "1"]])
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(got, [[1.0, 0.0, np.nan], [1.0, 1.0, 0.0]])


def test_reward_accuracy_hand_example():
    self_r = np.array([[3.0, 1.0, 2.0], [3.0, 1.0, 2.0], [3.0, 1.0, 2.0], [3.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    oracle_r = np.array(
        [
            [1.0, 0.0, 0.0],  # chosen 0 correct, rejected 1 wrong: right
            [0.0, 1.0, 1.0],  # reversed: wrong
            [1.0, 1.0, 0.0],  # oracle tie on (0, 1): excluded
            [1.0, np.nan, 1.0],  # oracle missing: excluded
            [1.0, 0.0, 0.0],  # self-reward tie: no pair
        ]
    )
    run = jax.jit(lambda s, o: (reward_accuracy(s, o), reward_accuracy(s, o, build_pairs(s))))
    acc, explicit = run(self_r, oracle_r)
    assert float(acc.accuracy) == pytest.approx(0.5)
    assert (int(acc.n_compared), int(acc.n_oracle_ties), int(acc.n_oracle_missing)) == (2, 1, 1)
    assert float(explicit.accuracy) == pytest.approx(0.5)
    nothing, _ = run(self_r[[2, 3, 4]], oracle_r[[2, 3, 4]])  # only oracle ties, missing, self ties
    assert np.isnan(float(nothing.accuracy))


def test_pairwise_accuracy_matches_loop():
    rng = np.random.default_rng(1)
    s = rng.integers(0, 4, (10, 5)).astype(np.float32)
    o = rng.integers(0, 3, (10, 5)).astype(np.float32)
    mask = rng.random((10, 5)) < 0.8
    correct = total = 0
    for b in range(10):
        for i, j in itertools.combinations(range(5), 2):
            if mask[b, i] and mask[b, j] and o[b, i] != o[b, j]:
                total += 1
                correct += np.sign(s[b, i] - s[b, j]) == np.sign(o[b, i] - o[b, j])
    acc, n = jax.jit(pairwise_accuracy)(s, o, mask)
    assert int(n) == total
    assert float(acc) == pytest.approx(correct / total)


def test_bad_input():
    with pytest.raises(ValueError, match="implicit"):
        implicit(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="likelihood"):
        likelihood(np.zeros((2, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="weights"):
        ensemble([np.zeros(3), np.zeros(3)], [1.0])
    with pytest.raises(ValueError, match="shape"):
        ensemble([np.zeros(3), np.zeros(4)])
    with pytest.raises(ValueError, match="same number of responses"):
        oracle(lambda p, r: 1.0, ["a", "b"], [["x"], ["x", "y"]])
    with pytest.raises(ValueError, match="prompts"):
        oracle(lambda p, r: 1.0, ["a"], [["x"], ["y"]])
    with pytest.raises(ValueError, match="reward_accuracy"):
        reward_accuracy(np.zeros((2, 3)), np.zeros((2, 4)))


def test_compiles_once():
    traces = []

    def step(lp, lr, n, o):
        traces.append(1)  # runs only while tracing
        r_now = implicit(lp, lr)
        r_prev = likelihood(lr, n)
        return reward_accuracy(r_now, o), pairwise_accuracy(r_now, o), ensemble([r_now, r_prev], [0.5, 0.5])

    jitted = jax.jit(step)
    rng = np.random.default_rng(2)
    for _ in range(2):
        jitted(rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.integers(1, 9, (4, 3)), rng.integers(0, 2, (4, 3)))
    assert len(traces) == 1
