"""Ranking agreement between two reward sources: Kendall tau, Spearman rho, TopOrder, consistency rate.

CREAM (METHODS.md 2.2 d, 2.3) ranks the N responses of each prompt with the current and the previous
model's reward and turns the agreement of the two rankings into a consistency rate C in [0, 1].
Everything here is a plain ``jnp`` function over arrays ``[..., N]`` (any leading batch shape, one
ranking per leading index), safe under ``jax.jit`` and ``jax.vmap``; the Kendall pairwise sign kernel is
O(N^2) per prompt, a ``lax.scan`` over the pairs, vectorized over all prompts at once.

Masks: ``mask [..., N]`` (True = a real response) drops padded responses, so prompts may have
different numbers of valid responses. Non-finite rewards (NaN: e.g. a judge that failed to parse)
are treated as masked as well.

Undefined values (fewer than 2 valid responses, or a constant ranking on either side) return 0
(tau, rho) or 0 (TopOrder) and are flagged by the ``valid`` indicator of :func:`consistency_rate`.

Shape letters: B batch (prompts; any number of leading axes), N responses per prompt
(R elsewhere in the package).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

_TIES = ("b", "ordinal")
_METHODS = ("kendall", "spearman", "toporder")
_LEVELS = ("dyn", "avg")


def _check(x, y, mask, fn: str):
    """Validates shapes and returns float arrays plus the validity mask [..., N]."""
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.ndim == 0 or x.shape != y.shape:
        raise ValueError(f"{fn}: x and y must have the same shape [..., N], got {x.shape} and {y.shape}")
    dtype = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    x = x.astype(dtype)
    y = y.astype(dtype)
    valid = jnp.isfinite(x) & jnp.isfinite(y)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != x.shape:
            raise ValueError(f"{fn}: mask must have the shape of x {x.shape}, got {mask.shape}")
        valid = valid & mask.astype(bool)
    # Zero the dropped entries so that differences below stay finite (they are masked anyway).
    return jnp.where(valid, x, 0), jnp.where(valid, y, 0), valid


def _pair_counts(x, y, valid, ordinal: bool):
    """Pair statistics of two rankings over the N(N-1)/2 pairs i < j.

    A ``lax.scan`` over the static pair list with [M]-vector carries: every step is elementwise over
    the prompts, which XLA vectorizes well on CPU, and compile time does not grow with N (unrolled
    pairs or [M, N, N] reductions over short rows were 3-10x slower; bench/consistency.py).

    Args:
      x: [..., N] float, zero where invalid.
      y: [..., N] float, zero where invalid.
      valid: [..., N] bool.
      ordinal: break ties by position (rankdata "ordinal": for i < j the earlier one ranks lower).

    Returns:
      (n_pairs, concordant_minus_discordant, tied_x, tied_y), each [...] float, counted over the
      pairs whose two entries are valid.
    """
    lead, n = x.shape[:-1], x.shape[-1]
    xt, yt, vt = (a.reshape(-1, n).T for a in (x, y, valid))  # [N, M]: prompts on the minor axis
    zero = jnp.zeros(xt.shape[1], x.dtype)
    first, second = np.triu_indices(n, k=1)  # static: N is a static shape

    def step(carry, pair):
        n_pairs, cmd, tied_x, tied_y = carry
        i, j = pair
        pv = vt[i] & vt[j]
        sx = jnp.sign(xt[i] - xt[j])
        sy = jnp.sign(yt[i] - yt[j])
        if ordinal:
            # METHODS 2.3 / 2.7-8: the official code ranks with rankdata(method="ordinal"), so a tied
            # pair i < j gets sign(rank_i - rank_j) = -1 and no pair is tied.
            sx = jnp.where(sx == 0, -1.0, sx)
            sy = jnp.where(sy == 0, -1.0, sy)
        return (
            n_pairs + pv,
            cmd + jnp.where(pv, sx * sy, 0.0),  # tied pairs contribute 0 (METHODS 1)
            tied_x + (pv & (sx == 0)),
            tied_y + (pv & (sy == 0)),
        ), None

    carry, _ = lax.scan(step, (zero,) * 4, (jnp.asarray(first), jnp.asarray(second)), unroll=4)
    return tuple(c.reshape(lead) for c in carry)


def _kendall(x, y, mask, ties: str):
    """(tau [...], defined [...]) shared by kendall_tau and consistency_rate."""
    if ties not in _TIES:
        raise ValueError(f"kendall_tau: ties must be one of {_TIES}, got {ties!r}")
    x, y, valid = _check(x, y, mask, "kendall_tau")
    n0, con_minus_dis, tied_x, tied_y = _pair_counts(x, y, valid, ordinal=ties == "ordinal")
    untied_x = n0 - tied_x
    untied_y = n0 - tied_y
    # tau-b = (P - Q) / sqrt((n0 - n1) (n0 - n2)) as scipy.stats.kendalltau (variant "b"); without
    # ties it is tau-a of METHODS 1.
    defined = (untied_x > 0) & (untied_y > 0)
    denom = jnp.sqrt(jnp.where(defined, untied_x * untied_y, 1.0))
    tau = jnp.where(defined, jnp.clip(con_minus_dis / denom, -1.0, 1.0), 0.0)
    return tau, defined


def kendall_tau(x, y, mask=None, ties: str = "b"):
    """Kendall rank correlation of two rankings per prompt.

    Args:
      x: [..., N] scores of the first ranker (e.g. the current model's rewards).
      y: [..., N] scores of the second ranker.
      mask: optional [..., N] bool, True for real responses; padded ones are dropped.
      ties: "b" gives tau-b, equal to ``scipy.stats.kendalltau`` (default variant) on the valid
        entries; "ordinal" ranks ties by position first, equal to ``scipy.stats.kendalltau`` on
        ``rankdata(., method="ordinal")`` ranks, as the official CREAM code computes it.

    Returns:
      tau [...] in [-1, 1]; 0 where undefined (fewer than 2 valid entries or a constant ranking).
    """
    return _kendall(x, y, mask, ties)[0]


def _varies(x, valid):
    """[...] bool: the valid entries of x are not all equal (so at least 2 are valid)."""
    inf = jnp.asarray(jnp.inf, x.dtype)
    return jnp.max(jnp.where(valid, x, -inf), axis=-1) > jnp.min(jnp.where(valid, x, inf), axis=-1)


def _average_ranks(x, valid):
    """Average ranks (1-based, ties share their mean rank) among the valid entries; [..., N]."""
    xi = x[..., :, None]
    xj = x[..., None, :]
    vj = valid[..., None, :]
    less = jnp.sum(vj & (xj < xi), axis=-1)
    equal = jnp.sum(vj & (xj == xi), axis=-1)  # includes i itself when valid
    return less + (equal + 1) / 2.0


def _spearman(x, y, mask):
    """(rho [...], defined [...]) shared by spearman and consistency_rate."""
    x, y, valid = _check(x, y, mask, "spearman")
    vf = valid.astype(x.dtype)
    n = jnp.sum(vf, axis=-1, keepdims=True)
    rx = _average_ranks(x, valid)
    ry = _average_ranks(y, valid)
    cx = (rx - jnp.sum(rx * vf, axis=-1, keepdims=True) / jnp.maximum(n, 1.0)) * vf
    cy = (ry - jnp.sum(ry * vf, axis=-1, keepdims=True) / jnp.maximum(n, 1.0)) * vf
    # Tested exactly on the values, not on a float variance that may be a rounding residue.
    defined = _varies(x, valid) & _varies(y, valid)
    sxx = jnp.sum(cx * cx, axis=-1)
    syy = jnp.sum(cy * cy, axis=-1)
    denom = jnp.sqrt(jnp.where(defined, sxx * syy, 1.0))
    rho = jnp.where(defined, jnp.clip(jnp.sum(cx * cy, axis=-1) / denom, -1.0, 1.0), 0.0)
    return rho, defined


def spearman(x, y, mask=None):
    """Spearman rank correlation per prompt (Pearson correlation of average ranks).

    Args:
      x: [..., N] scores of the first ranker.
      y: [..., N] scores of the second ranker.
      mask: optional [..., N] bool, True for real responses.

    Returns:
      rho [...] in [-1, 1], equal to ``scipy.stats.spearmanr`` on the valid entries; 0 where
      undefined (fewer than 2 valid entries or a constant ranking).
    """
    return _spearman(x, y, mask)[0]


def _top_order(x, y, mask):
    """(agree [...] float in {0, 1}, defined [...]) shared by top_order and consistency_rate."""
    x, y, valid = _check(x, y, mask, "top_order")
    inf = jnp.asarray(jnp.inf, x.dtype)
    # First occurrence on ties, like np.argmax / np.argmin in the official pair construction.
    same_best = jnp.argmax(jnp.where(valid, x, -inf), axis=-1) == jnp.argmax(jnp.where(valid, y, -inf), axis=-1)
    same_worst = jnp.argmin(jnp.where(valid, x, inf), axis=-1) == jnp.argmin(jnp.where(valid, y, inf), axis=-1)
    defined = _varies(x, valid) & _varies(y, valid)
    return jnp.where(defined & same_best & same_worst, 1.0, 0.0).astype(x.dtype), defined


def top_order(x, y, mask=None):
    """TopOrder: 1 if the two rankers agree on both the best and the worst response, else 0.

    This is the intended metric (METHODS 2.7-7: argmax and argmin agree), not the official code's
    comparison of the ranks of responses #0 and #N-1. Ties resolve to the first occurrence.

    Args:
      x: [..., N] scores of the first ranker.
      y: [..., N] scores of the second ranker.
      mask: optional [..., N] bool, True for real responses.

    Returns:
      [...] float in {0, 1}; 0 where undefined (fewer than 2 valid entries or a constant ranking).
    """
    return _top_order(x, y, mask)[0]


def consistency_rate(
    r_now,
    r_prev,
    mask=None,
    method: str = "kendall",
    level: str = "dyn",
    ties: str = "b",
    return_valid: bool = False,
):
    """CREAM consistency rate C between the current and the previous reward (METHODS 2.3, section 0).

    Kendall and Spearman values v are scaled to (v + 1) / 2; TopOrder is used as is. With
    ``level="dyn"`` each prompt keeps its own C_j and prompts with an undefined value get the average
    over the defined prompts (keyed by position, i.e. by prompt: never shifted, cf. bug 2.7-5).
    With ``level="avg"`` every prompt gets that set average (the paper's C). The set is every
    leading index of the arrays passed in: pass the whole prompt set to get the paper's C. If no
    prompt has a defined value, C = 1/2 everywhere (tau = 0: no information; never 0, which would
    train on fully reversed pairs).

    Args:
      r_now: [..., N] rewards of the current model (ranking J).
      r_prev: [..., N] rewards of the previous model (ranking K).
      mask: optional [..., N] bool, True for real responses.
      method: "kendall" | "spearman" | "toporder".
      level: "dyn" (per prompt) | "avg" (set level).
      ties: Kendall tie handling, "b" (default) or "ordinal" (official code).
      return_valid: also return the indicator of prompts whose value is defined.

    Returns:
      C [...] in [0, 1], or (C [...], valid [...] bool) with ``return_valid=True``.
    """
    if method not in _METHODS:
        raise ValueError(f"consistency_rate: method must be one of {_METHODS}, got {method!r}")
    if level not in _LEVELS:
        raise ValueError(f"consistency_rate: level must be one of {_LEVELS}, got {level!r}")
    if method == "kendall":
        v, defined = _kendall(r_now, r_prev, mask, ties)
        c = (v + 1.0) / 2.0  # METHODS 2.3: C = (tau + 1) / 2
    elif method == "spearman":
        v, defined = _spearman(r_now, r_prev, mask)
        c = (v + 1.0) / 2.0
    else:
        c, defined = _top_order(r_now, r_prev, mask)
    n_defined = jnp.sum(defined)
    c_avg = jnp.where(n_defined > 0, jnp.sum(jnp.where(defined, c, 0.0)) / jnp.maximum(n_defined, 1), 0.5)
    if level == "avg":
        out = jnp.broadcast_to(c_avg, c.shape).astype(c.dtype)
    else:
        out = jnp.where(defined, c, c_avg).astype(c.dtype)
    return (out, defined) if return_valid else out
