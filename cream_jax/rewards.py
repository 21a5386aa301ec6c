"""Reward sources over the R responses of B prompts, and reward accuracy against an oracle (METHODS 1, 0).

The array functions are plain ``jnp`` (jit/vmap-safe); they take the per-sequence log-probs that
``cream_jax.scoring.sequence_logprobs`` returns (``sum_logp [B*R]``, ``n_tokens [B*R]``, reshaped to
[B, R] by the caller). ``oracle`` runs a Python task verifier on the host. The LLM-as-a-judge reward
is in ``cream_jax.judge``.

A reward of NaN means "no score" (an empty response, a failed verifier or judge); the consumers in
``consistency`` and ``preference`` treat it as a masked response.

Shape letters: B batch (prompts), R responses per prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cream_jax.preference import Pairs, build_pairs, take_pair


def implicit(logp_policy, logp_ref, beta: float = 1.0):
    """DPO implicit reward r = beta * (logp_policy(y|x) - logp_ref(y|x)) (METHODS 1).

    CREAM ranks with beta = 1 on summed log-probs (a ranking is invariant to beta > 0, METHODS 2.2 b);
    SeRA margins use the training beta.

    Args:
      logp_policy: [B, R] (or any shape) summed log-probs under the policy.
      logp_ref: same shape, under the reference (M0 for CREAM's default "initial" reference).
      beta: scale.

    Returns:
      rewards, same shape, float32.
    """
    if jnp.shape(logp_policy) != jnp.shape(logp_ref):
        raise ValueError(f"implicit: logp_policy {jnp.shape(logp_policy)} and logp_ref {jnp.shape(logp_ref)} differ in shape")
    return beta * (jnp.asarray(logp_policy, jnp.float32) - jnp.asarray(logp_ref, jnp.float32))


def likelihood(sum_logp, n_tokens):
    """Length-normalised log-likelihood logp(y|x) / |S(y)|: M0's reward, which has no reference (METHODS 2.7-1).

    Args:
      sum_logp: [B, R] summed log-probs of the scored tokens.
      n_tokens: [B, R] number of scored tokens.

    Returns:
      [B, R] float32; NaN where n_tokens == 0 (no score, rather than the best possible reward 0).
    """
    if jnp.shape(sum_logp) != jnp.shape(n_tokens):
        raise ValueError(f"likelihood: sum_logp {jnp.shape(sum_logp)} and n_tokens {jnp.shape(n_tokens)} differ in shape")
    n = jnp.asarray(n_tokens, jnp.float32)
    return jnp.where(n > 0, jnp.asarray(sum_logp, jnp.float32) / jnp.maximum(n, 1.0), jnp.nan)


def ensemble(rewards_list: Sequence[Any], weights: Sequence[float] | None = None):
    """Weighted sum of reward arrays, e.g. SeRA's w * r_t + (1 - w) * r_{t-1} (METHODS 4.2 step 4, [MEM]).

    Args:
      rewards_list: K arrays of one shape [B, R].
      weights: K weights (default: equal weights 1/K).

    Returns:
      [B, R] float32 sum_k weights[k] * rewards_list[k].
    """
    if not rewards_list:
        raise ValueError("ensemble: rewards_list is empty")
    weights = [1.0 / len(rewards_list)] * len(rewards_list) if weights is None else list(weights)
    if len(weights) != len(rewards_list):
        raise ValueError(f"ensemble: {len(weights)} weights for {len(rewards_list)} reward arrays")
    shapes = {jnp.shape(r) for r in rewards_list}
    if len(shapes) != 1:
        raise ValueError(f"ensemble: reward arrays differ in shape: {sorted(shapes)}")
    return sum(w * jnp.asarray(r, jnp.float32) for w, r in zip(weights, rewards_list))


def oracle(verifier: Callable[[Any, str], float | bool | None], prompts: Sequence[Any], responses: Sequence[Sequence[str]]):
    """Oracle rewards from a Python task verifier, on the host.

    Args:
      verifier: ``verifier(prompt, response) -> float | bool | None`` (e.g. 1.0 for a correct final
        answer, 0.0 otherwise; None when it cannot judge).
      prompts: B prompt records (whatever the verifier expects: a task dict, a string).
      responses: B lists of R decoded responses.

    Returns:
      np.ndarray [B, R] float32; NaN where the verifier returned None.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"oracle: {len(prompts)} prompts but {len(responses)} response lists")
    widths = {len(r) for r in responses}
    if len(widths) > 1:
        raise ValueError(f"oracle: every prompt needs the same number of responses R, got {sorted(widths)}")
    out = np.full((len(prompts), widths.pop() if widths else 0), np.nan, np.float32)
    for b, (prompt, rs) in enumerate(zip(prompts, responses)):
        for r, response in enumerate(rs):
            score = verifier(prompt, response)
            if score is not None:
                out[b, r] = float(score)
    return out


class RewardAccuracy(NamedTuple):
    """Agreement of the self-reward's best-vs-worst pairs with an oracle.

    Attributes:
      accuracy: scalar, n_correct / n_compared (NaN when nothing was compared).
      n_compared: pairs kept by the self-reward on which the oracle has a strict preference.
      n_oracle_ties: kept pairs the oracle scores equally (excluded from the denominator).
      n_oracle_missing: kept pairs with a missing (NaN) oracle score (excluded as well).
    """

    accuracy: jax.Array
    n_compared: jax.Array
    n_oracle_ties: jax.Array
    n_oracle_missing: jax.Array


def reward_accuracy(self_reward, oracle_reward, pairs: Pairs | None = None, mask=None) -> RewardAccuracy:
    """How often the self-reward's chosen response beats its rejected one under the oracle.

    Only pairs on which the oracle has a strict preference count: oracle ties (e.g. two correct
    answers under a 0/1 verifier) and missing oracle scores are excluded from the denominator and
    counted separately.

    Args:
      self_reward: [B, R] rewards that built the pairs.
      oracle_reward: [B, R] oracle rewards of the same responses (``oracle``).
      pairs: pairs to score; None builds them with ``build_pairs(self_reward, mask)``.
      mask: optional [B, R] bool, used only when ``pairs`` is None.

    Returns:
      RewardAccuracy of scalars.
    """
    self_reward = jnp.asarray(self_reward, jnp.float32)
    oracle_reward = jnp.asarray(oracle_reward, jnp.float32)
    if self_reward.ndim != 2 or self_reward.shape != oracle_reward.shape:
        raise ValueError(
            f"reward_accuracy: self_reward and oracle_reward must be [B, R] of one shape, got "
            f"{self_reward.shape} and {oracle_reward.shape}"
        )
    if pairs is None:
        pairs = build_pairs(self_reward, mask)
    oc, orj = take_pair(oracle_reward, pairs)
    missing = pairs.keep & ~(jnp.isfinite(oc) & jnp.isfinite(orj))
    ties = pairs.keep & ~missing & (oc == orj)
    compared = pairs.keep & ~missing & ~ties
    n_compared = jnp.sum(compared)
    n_correct = jnp.sum(compared & (oc > orj))
    accuracy = jnp.where(n_compared > 0, n_correct / jnp.maximum(n_compared, 1), jnp.nan)
    return RewardAccuracy(accuracy, n_compared, jnp.sum(ties), jnp.sum(missing))


def pairwise_accuracy(self_reward, oracle_reward, mask=None):
    """Share of all response pairs i < j of a prompt that the self-reward orders like the oracle.

    SRLM's reward-modelling "pairwise accuracy" (METHODS 3.5, [MEM] definition). Pairs the oracle ties
    or cannot score are excluded; a self-reward tie on an oracle-ordered pair counts as wrong.

    Args:
      self_reward: [B, R].
      oracle_reward: [B, R].
      mask: optional [B, R] bool.

    Returns:
      (accuracy scalar, NaN when no pair is ordered by the oracle; n_pairs scalar compared).
    """
    s = jnp.asarray(self_reward, jnp.float32)
    o = jnp.asarray(oracle_reward, jnp.float32)
    if s.ndim != 2 or s.shape != o.shape:
        raise ValueError(f"pairwise_accuracy: rewards must be [B, R] of one shape, got {s.shape} and {o.shape}")
    valid = jnp.isfinite(s) & jnp.isfinite(o)
    if mask is not None:
        valid = valid & jnp.asarray(mask, bool)
    i, j = np.triu_indices(s.shape[1], k=1)
    pair_valid = valid[:, i] & valid[:, j]
    so = jnp.sign(o[:, i] - o[:, j])
    ss = jnp.sign(s[:, i] - s[:, j])
    counted = pair_valid & (so != 0)
    n = jnp.sum(counted)
    correct = jnp.sum(counted & (ss == so))
    return jnp.where(n > 0, correct / jnp.maximum(n, 1), jnp.nan), n
