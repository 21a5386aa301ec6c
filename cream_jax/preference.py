"""Preference pairs from per-response rewards: best-vs-worst, SeRA margin selection, SCIR agreement.

Plain ``jnp`` functions with static shapes (a dropped pair is a False entry of a ``keep`` mask, never a
shorter array), safe under ``jax.jit``; no model code. Rewards come from ``cream_jax.rewards``.

A response is valid when its mask entry is True and its reward is finite (a NaN reward, e.g. a judge
whose output did not parse, is no score). Ties resolve to the first occurrence, like ``np.argmax`` /
``np.argmin`` in the official CREAM code (METHODS 2.7-8).

Shape letters: B batch (prompts), R responses per prompt, T time (response tokens).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Pairs.status codes.
KEPT = 0
FEW_VALID = 1  # fewer than 2 valid responses
TIED = 2  # the best and the worst (distinct) response have the same reward
DUPLICATE = 3  # every other valid response is token-identical to the best one
UNSELECTED = 4  # a valid pair dropped by a margin selection (bootstrap_pairs)


class Pairs(NamedTuple):
    """One (chosen, rejected) pair per prompt; a pytree of [B] arrays.

    Attributes:
      chosen_idx: [B] int32 index of the chosen response (the best one).
      rejected_idx: [B] int32 index of the rejected response (the worst one).
      keep: [B] bool, whether the pair is used.
      margin: [B] float32 reward[chosen] - reward[rejected] (> 0 where kept, 0 where dropped).
      status: [B] int32, KEPT or why the pair was dropped (FEW_VALID, TIED, DUPLICATE, UNSELECTED).
    """

    chosen_idx: jax.Array
    rejected_idx: jax.Array
    keep: jax.Array
    margin: jax.Array
    status: jax.Array

    def counts(self) -> dict[str, jax.Array]:
        """Number of kept pairs and of drops per reason (int32 scalars, metric names)."""
        return {
            "pairs/kept": jnp.sum(self.keep),
            "pairs/dropped_few_valid": jnp.sum(self.status == FEW_VALID),
            "pairs/dropped_tied": jnp.sum(self.status == TIED),
            "pairs/dropped_duplicate": jnp.sum(self.status == DUPLICATE),
            "pairs/dropped_unselected": jnp.sum(self.status == UNSELECTED),
        }


def _same_as(response_ids, response_mask, idx):
    """[B, R] bool: response r is token-identical to response idx[b] (on its unmasked tokens).

    Args:
      response_ids: [B, R, T] int.
      response_mask: [B, R, T] bool or None (then every position counts).
      idx: [B] int.
    """
    ref_ids = jnp.take_along_axis(response_ids, idx[:, None, None], axis=1)  # [B, 1, T]
    if response_mask is None:
        return jnp.all(response_ids == ref_ids, axis=-1)
    m = response_mask.astype(bool)
    ref_m = jnp.take_along_axis(m, idx[:, None, None], axis=1)
    # Same length (mask) and same tokens wherever a token exists; padding contents are ignored.
    return jnp.all((m == ref_m) & (~m | (response_ids == ref_ids)), axis=-1)


def build_pairs(rewards, mask=None, *, response_ids=None, response_mask=None) -> Pairs:
    """Best-vs-worst pair per prompt from the current rewards (METHODS 2.2 e, 3.2).

    chosen = argmax, rejected = argmin of the reward over the valid responses (first occurrence). A
    prompt is dropped when it has fewer than 2 valid responses or when its best and worst rewards are
    equal (SRLM: "drop the prompt if max == min"). With ``response_ids``, responses token-identical to
    the chosen one are never its rejected partner (rejected = the worst response that differs from it);
    a prompt whose valid responses all equal the chosen one is dropped as DUPLICATE. The official CREAM
    code does no dedup (METHODS 2.7-8): leave ``response_ids`` None to reproduce it.

    Args:
      rewards: [B, R] float rewards of the current model.
      mask: optional [B, R] bool, True for real responses.
      response_ids: optional [B, R, T] int response tokens, for dedup.
      response_mask: optional [B, R, T] bool, the real tokens of ``response_ids``; positions outside it
        are ignored when comparing (otherwise every position is compared).

    Returns:
      Pairs of [B] arrays.
    """
    rewards = jnp.asarray(rewards)
    if rewards.ndim != 2:
        raise ValueError(f"build_pairs: rewards must be [B, R], got shape {rewards.shape}")
    rewards = rewards.astype(jnp.promote_types(rewards.dtype, jnp.float32))
    valid = jnp.isfinite(rewards)
    if mask is not None:
        if jnp.shape(mask) != rewards.shape:
            raise ValueError(f"build_pairs: mask must be [B, R] = {rewards.shape}, got {jnp.shape(mask)}")
        valid = valid & jnp.asarray(mask, bool)
    inf = jnp.asarray(jnp.inf, rewards.dtype)
    hi = jnp.where(valid, rewards, -inf)
    lo = jnp.where(valid, rewards, inf)
    chosen = jnp.argmax(hi, axis=-1)
    candidates = valid & (jnp.arange(rewards.shape[1]) != chosen[:, None])
    if response_ids is not None:
        if jnp.ndim(response_ids) != 3 or jnp.shape(response_ids)[:2] != rewards.shape:
            raise ValueError(
                f"build_pairs: response_ids must be [B, R, T] with [B, R] = {rewards.shape}, got {jnp.shape(response_ids)}"
            )
        if response_mask is not None and jnp.shape(response_mask) != jnp.shape(response_ids):
            raise ValueError(
                f"build_pairs: response_mask must match response_ids {jnp.shape(response_ids)}, got {jnp.shape(response_mask)}"
            )
        rm = None if response_mask is None else jnp.asarray(response_mask)
        candidates = candidates & ~_same_as(jnp.asarray(response_ids), rm, chosen)
    rejected = jnp.argmin(jnp.where(candidates, rewards, inf), axis=-1)
    margin = jnp.take_along_axis(rewards, chosen[:, None], 1)[:, 0] - jnp.take_along_axis(rewards, rejected[:, None], 1)[:, 0]

    n_valid = jnp.sum(valid, axis=-1)
    all_tied = jnp.max(hi, axis=-1) <= jnp.min(lo, axis=-1)
    status = jnp.where(
        n_valid < 2,
        FEW_VALID,
        jnp.where(all_tied, TIED, jnp.where(~jnp.any(candidates, axis=-1), DUPLICATE, jnp.where(margin > 0, KEPT, TIED))),
    ).astype(jnp.int32)
    keep = status == KEPT
    return Pairs(
        chosen_idx=chosen.astype(jnp.int32),
        rejected_idx=rejected.astype(jnp.int32),
        keep=keep,
        margin=jnp.where(keep, margin, 0.0).astype(jnp.float32),
        status=status,
    )


def take_pair(x, pairs: Pairs):
    """Gathers the chosen and the rejected entries of a per-response array.

    Args:
      x: [B, R, ...] (e.g. response tokens [B, R, T] or log-probs [B, R]).
      pairs: Pairs from :func:`build_pairs`.

    Returns:
      (chosen [B, ...], rejected [B, ...]).
    """
    x = jnp.asarray(x)

    def one(idx):
        return jnp.take_along_axis(x, idx.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]

    return one(pairs.chosen_idx), one(pairs.rejected_idx)


def select_by_margin(margins, keep, ratio, largest: bool = True):
    """SeRA sample selection: keep the top ``ratio`` fraction of the kept pairs by margin (METHODS 4.2).

    [MEM] reconstruction: ``keep iff rank_desc(IRM) <= k |D|``; here the round(ratio * n_kept) kept pairs
    with the largest implicit reward margins (ties: the earlier pair first) stay, as a mask of static
    shape. ``largest=False`` keeps the smallest margins instead.

    Args:
      margins: [B] float implicit reward margins r(x, y_w) - r(x, y_l) (non-finite ones are dropped).
      keep: [B] bool, pairs eligible for selection.
      ratio: fraction in [0, 1] (a float or a traced scalar).
      largest: keep the largest margins (True) or the smallest (False).

    Returns:
      keep [B] bool, a subset of ``keep``.
    """
    margins = jnp.asarray(margins, jnp.float32)
    keep = jnp.asarray(keep, bool)
    if margins.ndim != 1 or keep.shape != margins.shape:
        raise ValueError(f"select_by_margin: margins and keep must be [B], got {margins.shape} and {keep.shape}")
    if isinstance(ratio, (int, float)) and not 0.0 <= ratio <= 1.0:
        raise ValueError(f"select_by_margin: ratio must lie in [0, 1], got {ratio}")
    eligible = keep & jnp.isfinite(margins)
    key = jnp.where(eligible, -margins if largest else margins, jnp.inf)
    order = jnp.argsort(key, stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    k = jnp.round(ratio * jnp.sum(eligible))
    return eligible & (rank < k)


def bootstrap_pairs(rewards, mask=None, *, ratio: float = 1.0, response_ids=None, response_mask=None) -> Pairs:
    """SeRA preference bootstrapping on fresh samples of the updated policy (METHODS 4.2 step 3).

    [MEM] reconstruction, generic in R: label each prompt's fresh responses by the implicit reward
    (chosen = the highest, rejected = the lowest; with R = 2 this is ``z = 1[r_a >= r_b]``), score the
    pair by its reward gap |r_a - r_b| (= the margin), and keep the top ``ratio`` fraction by gap.
    Exact ties (gap 0) are dropped rather than labelled "a": they carry no preference and would rank
    last anyway. Pairs dropped by the selection get status UNSELECTED.

    Args:
      rewards: [B, R] implicit rewards r_theta_t of the fresh responses (``rewards.implicit``).
      mask: optional [B, R] bool.
      ratio: fraction of the labelled pairs to keep, in [0, 1].
      response_ids: optional [B, R, T] for dedup (see :func:`build_pairs`).
      response_mask: optional [B, R, T].

    Returns:
      Pairs.
    """
    pairs = build_pairs(rewards, mask, response_ids=response_ids, response_mask=response_mask)
    keep = select_by_margin(pairs.margin, pairs.keep, ratio)
    status = jnp.where(pairs.keep & ~keep, UNSELECTED, pairs.status).astype(jnp.int32)
    return pairs._replace(keep=keep, status=status)


def agreement_mask(r1, r2, pairs: Pairs):
    """SCIR static filter: whether two reward sources order each pair the same way (METHODS 5.2).

    The per-step dynamic agreement lives in ``losses.scir_loss``; this one filters pairs once, before
    training. A tie or a non-finite reward under either source counts as disagreement.

    Args:
      r1: [B, R] rewards of the first source (e.g. the implicit reward that built ``pairs``).
      r2: [B, R] rewards of the second source (e.g. the judge's scores).
      pairs: Pairs over the same responses.

    Returns:
      [B] bool: pair kept and sign(r1[c] - r1[j]) == sign(r2[c] - r2[j]) != 0.
    """
    r1 = jnp.asarray(r1, jnp.float32)
    r2 = jnp.asarray(r2, jnp.float32)
    if r1.ndim != 2 or r1.shape != r2.shape or r1.shape[0] != pairs.keep.shape[0]:
        raise ValueError(f"agreement_mask: r1 and r2 must be [B, R] matching pairs, got {r1.shape} and {r2.shape}")
    c1, j1 = take_pair(r1, pairs)
    c2, j2 = take_pair(r2, pairs)
    # Signs, not the product of differences: the product may overflow.
    return pairs.keep & (jnp.sign(c1 - j1) * jnp.sign(c2 - j2) > 0)
