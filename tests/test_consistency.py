"""cream_jax.consistency against scipy.stats on random rankings, with ties and masks."""

import warnings

import chex
import jax
import numpy as np
import pytest
from scipy import stats

from cream_jax.consistency import consistency_rate, kendall_tau, spearman, top_order

# Real widths N; every valid count 0..N is reached through masks (one compile per width keeps the
# file fast: eager op-by-op dispatch compiles each primitive per shape).
WIDTHS = (2, 7, 20)
_kendall = jax.jit(kendall_tau, static_argnames="ties")
_spearman = jax.jit(spearman)
_top = jax.jit(top_order)
_rate = jax.jit(consistency_rate, static_argnames=("method", "level", "ties", "return_valid"))


def _scipy_or_zero(fn, a, b):
    """scipy statistic on the valid entries, with our convention: undefined -> 0."""
    if len(a) < 2:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on constant input, then returns NaN
        v = fn(a, b).statistic
    return 0.0 if np.isnan(v) else float(v)


def _random_mask(rng, b, n):
    """Rows with every number of valid entries 0..n, at random positions."""
    counts = np.arange(b) % (n + 1)
    return np.stack([rng.permutation(n) < c for c in counts])


def _random_batch(rng, b, n, integer):
    if integer:  # few distinct values force ties
        return rng.integers(0, 3, size=(b, n)).astype(np.float32), rng.integers(0, 3, size=(b, n)).astype(np.float32)
    return rng.normal(size=(b, n)).astype(np.float32), rng.normal(size=(b, n)).astype(np.float32)


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
def test_kendall_tau_b_matches_scipy(integer, use_mask):
    rng = np.random.default_rng(0)
    for n in WIDTHS:
        x, y = _random_batch(rng, 40, n, integer)
        mask = _random_mask(rng, 40, n) if use_mask else np.ones((40, n), bool)
        got = np.asarray(_kendall(x, y, mask))
        want = [_scipy_or_zero(stats.kendalltau, x[b][mask[b]], y[b][mask[b]]) for b in range(40)]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"N={n}")


@pytest.mark.parametrize("use_mask", [False, True])
def test_kendall_tau_ordinal_matches_scipy_on_ordinal_ranks(use_mask):
    rng = np.random.default_rng(1)
    for n in WIDTHS:
        x, y = _random_batch(rng, 40, n, integer=True)
        mask = _random_mask(rng, 40, n) if use_mask else np.ones((40, n), bool)
        got = np.asarray(_kendall(x, y, mask, ties="ordinal"))
        want = []
        for b in range(40):
            xs, ys = x[b][mask[b]], y[b][mask[b]]
            want.append(
                _scipy_or_zero(stats.kendalltau, stats.rankdata(xs, method="ordinal"), stats.rankdata(ys, method="ordinal"))
            )
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"N={n}")


def test_ordinal_differs_from_tau_b_on_ties():
    # Official code vs scipy default on tied scores (METHODS 2.7-8): they must not be confused.
    x = np.array([1.0, 1.0, 2.0, 3.0])
    y = np.array([1.0, 2.0, 3.0, 4.0])
    assert abs(float(_kendall(x, y)) - stats.kendalltau(x, y).statistic) < 1e-6
    assert abs(float(_kendall(x, y, ties="ordinal")) - 1.0) < 1e-6
    assert float(_kendall(x, y)) < 0.95


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
def test_spearman_matches_scipy(integer, use_mask):
    rng = np.random.default_rng(2)
    for n in WIDTHS:
        x, y = _random_batch(rng, 40, n, integer)
        mask = _random_mask(rng, 40, n) if use_mask else np.ones((40, n), bool)
        got = np.asarray(_spearman(x, y, mask))
        want = [_scipy_or_zero(stats.spearmanr, x[b][mask[b]], y[b][mask[b]]) for b in range(40)]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"N={n}")


def test_special_rankings():
    x = np.array([[0.3, -1.0, 2.0, 0.5]], np.float32)
    for fn in (_kendall, _spearman):
        assert float(fn(x, x)[0]) == pytest.approx(1.0, abs=1e-6)
        assert float(fn(x, -x)[0]) == pytest.approx(-1.0, abs=1e-6)
        assert float(fn(np.full_like(x, 2.0), x)[0]) == 0.0  # constant ranking: undefined -> 0
        assert float(fn(x, x, np.array([[True, False, False, False]]))[0]) == 0.0  # < 2 valid
        assert float(fn(x[:, :1], x[:, :1])[0]) == 0.0  # N = 1
    assert float(_rate(x, x)[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(_rate(x, -x)[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(_rate(x, x, method="spearman")[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(_rate(x, -x, method="toporder")[0]) == 0.0


def test_nan_counts_as_masked():
    rng = np.random.default_rng(3)
    x, y = _random_batch(rng, 8, 6, integer=False)
    x_nan = x.copy()
    x_nan[:, 2] = np.nan
    mask = np.ones_like(x, bool)
    mask[:, 2] = False
    np.testing.assert_allclose(_kendall(x_nan, y), _kendall(x, y, mask), atol=1e-6)
    np.testing.assert_allclose(_spearman(x_nan, y), _spearman(x, y, mask), atol=1e-6)


def test_top_order():
    x = np.array(
        [
            [1.0, 5.0, 3.0, 0.0],  # best 1, worst 3
            [1.0, 5.0, 3.0, 0.0],
            [1.0, 5.0, 3.0, 0.0],
            [2.0, 2.0, 2.0, 2.0],  # constant: undefined
            [1.0, 5.0, 3.0, 0.0],
        ],
        np.float32,
    )
    y = np.array(
        [
            [2.0, 9.0, 8.0, -1.0],  # same best and worst, middle swapped: 1
            [2.0, 9.0, 8.0, 3.0],  # worst differs: 0
            [2.0, 1.0, 9.0, -1.0],  # best differs: 0
            [2.0, 9.0, 8.0, -1.0],
            [2.0, 9.0, 10.0, -1.0],  # best (idx 2) is masked out below -> agree
        ],
        np.float32,
    )
    mask = np.ones_like(x, bool)
    mask[4, 2] = False
    np.testing.assert_array_equal(np.asarray(_top(x, y, mask)), [1.0, 0.0, 0.0, 0.0, 1.0])
    _, valid = _rate(x, y, mask, method="toporder", return_valid=True)
    np.testing.assert_array_equal(np.asarray(valid), [True, True, True, False, True])


def test_consistency_rate_levels_and_fallback():
    rng = np.random.default_rng(4)
    x, y = _random_batch(rng, 6, 5, integer=False)
    x[2] = 1.0  # constant: undefined prompt
    mask = np.ones_like(x, bool)
    mask[4, 1:] = False  # one valid response: undefined prompt
    tau = np.array([_scipy_or_zero(stats.kendalltau, x[b][mask[b]], y[b][mask[b]]) for b in range(6)])
    defined = np.array([True, True, False, True, False, True])
    c_j = (tau + 1) / 2
    c_avg = c_j[defined].mean()
    dyn, valid = _rate(x, y, mask, level="dyn", return_valid=True)
    np.testing.assert_array_equal(np.asarray(valid), defined)
    np.testing.assert_allclose(np.asarray(dyn), np.where(defined, c_j, c_avg), atol=1e-6)
    np.testing.assert_allclose(np.asarray(_rate(x, y, mask, level="avg")), np.full(6, c_avg), atol=1e-6)
    rho = np.array([_scipy_or_zero(stats.spearmanr, x[b][mask[b]], y[b][mask[b]]) for b in range(6)])
    np.testing.assert_allclose(
        np.asarray(_rate(x, y, mask, method="spearman", level="avg")),
        np.full(6, ((rho[defined] + 1) / 2).mean()),
        atol=1e-6,
    )
    # Nothing defined anywhere: C = 1/2 (no information), never 0.
    np.testing.assert_allclose(np.asarray(_rate(np.ones((3, 4)), y[:3, :4])), 0.5)
    np.testing.assert_allclose(np.asarray(_rate(np.ones((3, 4)), y[:3, :4], method="toporder")), 0.5)


def test_bad_input():
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match="same shape"):
        _kendall(x, np.zeros((2, 4)))
    with pytest.raises(ValueError, match="mask"):
        _spearman(x, x, np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="ties"):
        _kendall(x, x, ties="a")
    with pytest.raises(ValueError, match="method"):
        _rate(x, x, method="pearson")
    with pytest.raises(ValueError, match="level"):
        _rate(x, x, level="mean")


def _all_metrics(a, b, m):
    return (
        kendall_tau(a, b, m),
        kendall_tau(a, b, m, ties="ordinal"),
        spearman(a, b, m),
        top_order(a, b, m),
    )


def test_compiles_once_and_maps_over_prompts():
    rng = np.random.default_rng(5)
    x, y = _random_batch(rng, 16, 8, integer=True)
    mask = rng.random((16, 8)) < 0.8
    traces = []

    def call(a, b, m):
        traces.append(1)  # runs only while tracing
        return _all_metrics(a, b, m), consistency_rate(a, b, m, return_valid=True)

    jitted = jax.jit(call)
    first, _ = jitted(x, y, mask)
    again, (c, valid) = jitted(x + 1.0, y * 2.0, ~mask)  # same shapes: no retrace
    assert len(traces) == 1
    chex.assert_shape([*again, c, valid], (16,))
    # Per-prompt functions: vmap over prompts (one [N] ranking each) == the batched call.
    vmapped = jax.jit(jax.vmap(_all_metrics))(x, y, mask)
    for v, f in zip(vmapped, first):
        np.testing.assert_allclose(np.asarray(v), np.asarray(f), atol=1e-6)
