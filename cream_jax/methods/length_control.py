"""Length-controlled self-reward: any method's current reward minus alpha x response length.

Length is the known failure mode of self-rewarding: when a self-reward prefers longer responses,
best-vs-worst pairs teach the policy to write more, not better. ``Run.method = "length_control"``
wraps the method ``LengthControl.base`` names (any registered one: "cream", "sera", "scir",
"srlm", ...) and changes one thing: the reward that ranks the pairs becomes

    r_lc(x, y) = r(x, y) - alpha_t * |y|,        |y| = response tokens (end-of-turn included)

with alpha_t either fixed (``LengthControl.alpha``) or searched at every iteration so that the
best-vs-worst pairs of r_lc have a mean length gap mean(|y+| - |y-|) of about zero, the sweep of
sail-sg/dice (scripts/data_script/generate_lc_paired_set.py, ``optimize_alpha``):

    for alpha in 0, s, 2s, ... < alpha_max  (s = LengthControl.alpha_step):
        gap(alpha) = mean over the kept best-vs-worst pairs of r - alpha * |y| of |y+| - |y-|
        stop at the first alpha whose |gap| exceeds the smallest |gap| seen before it
        (or whose gap is exactly 0, which no later alpha can beat: dice sweeps on, to the same result)
    alpha_t = the first alpha of the smallest |gap| among those tried

So alpha only ever penalises length (alpha >= 0: a pair set whose chosen responses are already
the shorter ones keeps alpha = 0), and the sweep stops once the gap starts to grow again. The
pairs are the loop's own (``preference.build_pairs``: ties and, with ``Reward.dedup``, identical
responses dropped). Everything else is the base method's: the models it scores, its consistency
(measured on its own, unadjusted ranker, so CREAM's soft label C is not inflated by the length
term both iterations would share), its selection, records, loss and SFT additions.

Reported in the iteration's row of results.json under "method": ``length_alpha``,
``length_gap_before`` / ``length_pairs_before`` (best-vs-worst pairs of the base reward, i.e.
alpha = 0), ``length_gap_after`` / ``length_pairs_after`` (of r_lc) and ``length_gap_trained``
(the pairs the base method's selection keeps under r_lc, e.g. SeRA's margin cut).

Shape letters: B prompts, R responses per prompt, S response tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cream_jax import preference
from cream_jax.methods.base import Method, register, registered


@functools.partial(jax.jit, static_argnames=("dedup",))
def _pair_gap(rewards, lengths, valid, tokens, token_mask, alpha, *, dedup):
    pairs = preference.build_pairs(rewards - alpha * lengths, valid, response_ids=tokens if dedup else None,
                                   response_mask=token_mask if dedup else None)
    chosen, rejected = preference.take_pair(lengths, pairs)
    n = jnp.sum(pairs.keep)
    return jnp.sum(jnp.where(pairs.keep, chosen - rejected, 0.0)) / jnp.maximum(n, 1), n


def pair_length_gap(rewards: np.ndarray, lengths: np.ndarray, valid: np.ndarray, alpha: float = 0.0,
                    tokens: np.ndarray | None = None, token_mask: np.ndarray | None = None) -> tuple[float | None, int]:
    """(mean |y+| - |y-| over the kept best-vs-worst pairs of ``rewards - alpha * lengths``, their number).

    Args:
      rewards: [B, R] the reward (NaN: no score).
      lengths: [B, R] response lengths in tokens.
      valid: [B, R] bool, responses that may be paired.
      alpha: the length penalty per token.
      tokens, token_mask: optional [B, R, S] response tokens: identical responses are not paired.

    Returns:
      (gap, or None without a kept pair; number of kept pairs).
    """
    dedup = tokens is not None
    gap, n = _pair_gap(jnp.asarray(rewards, jnp.float32), jnp.asarray(lengths, jnp.float32), jnp.asarray(valid, bool),
                       jnp.asarray(tokens if dedup else 0), jnp.asarray(token_mask if dedup else 0),
                       jnp.float32(alpha), dedup=dedup)
    return (float(gap) if int(n) else None), int(n)


def search_alpha(rewards: np.ndarray, lengths: np.ndarray, valid: np.ndarray, *, alpha_max: float, alpha_step: float,
                 tokens: np.ndarray | None = None, token_mask: np.ndarray | None = None) -> tuple[float, list]:
    """The length penalty of sail-sg/dice's sweep (module docstring): (alpha, [(alpha, gap)] tried).

    Without any kept pair at alpha = 0 there is no gap to control: alpha = 0.
    """
    tried: list[tuple[float, float]] = []
    for alpha in np.arange(0.0, alpha_max, alpha_step):
        gap, n = pair_length_gap(rewards, lengths, valid, float(alpha), tokens, token_mask)
        if gap is None:  # a penalty this large left no pair with distinct rewards
            break
        tried.append((float(alpha), gap))
        if gap == 0.0 or abs(gap) > min(abs(g) for _, g in tried):  # no better gap than 0 to find
            break
    if not tried:
        return 0.0, tried
    return tried[int(np.argmin([abs(g) for _, g in tried]))][0], tried


@register
class LengthControl(Method):
    name = "length_control"

    def __init__(self, cfg):
        super().__init__(cfg)
        base = cfg.length_control.base
        if base == self.name or base not in registered():
            others = sorted(set(registered()) - {self.name})
            raise ValueError(f"config: LengthControl.base={base!r} is not one of {', '.join(map(repr, others))}")
        self.base = registered()[base](dataclasses.replace(cfg, method=base))

    @property
    def consistency_level(self) -> str:
        return self.base.consistency_level

    def validate(self):
        self.base.validate()

    def sft_examples(self, eft):
        return self.base.sft_examples(eft)

    def learns_to_judge(self):
        return self.base.learns_to_judge()

    def models_to_score(self, t):
        return self.base.models_to_score(t)

    def _dedup(self, rollout):
        return (rollout.tokens, rollout.token_mask) if self.cfg.reward.dedup else (None, None)

    def rewards(self, ctx, rollout, logps):
        rw = self.base.rewards(ctx, rollout, logps)
        lengths = rollout.token_mask.sum(-1).astype(np.float32)  # [B, R]
        valid = rollout.valid & np.isfinite(rw.current)
        lc = self.cfg.length_control
        if lc.alpha is None:
            alpha, tried = search_alpha(rw.current, lengths, valid, alpha_max=lc.alpha_max, alpha_step=lc.alpha_step,
                                        tokens=self._dedup(rollout)[0], token_mask=self._dedup(rollout)[1])
        else:
            alpha, tried = float(lc.alpha), []
        before, n_before = pair_length_gap(rw.current, lengths, valid, 0.0, *self._dedup(rollout))
        after, n_after = pair_length_gap(rw.current, lengths, valid, alpha, *self._dedup(rollout))
        stats = {"length_alpha": alpha, "length_alphas_tried": len(tried), "length_gap_before": before,
                 "length_pairs_before": n_before, "length_gap_after": after, "length_pairs_after": n_after}
        return dataclasses.replace(
            rw, current=np.asarray(rw.current, np.float32) - np.float32(alpha) * lengths,
            ranker=rw.current if rw.ranker is None else rw.ranker, stats={**rw.stats, **stats})

    def select(self, ctx, rollout, rewards, pairs, consistency):
        sel = self.base.select(ctx, rollout, rewards, pairs, consistency)
        keep = np.asarray(sel.pairs.keep, bool)
        lengths = rollout.token_mask.sum(-1)
        rows = np.nonzero(keep)[0]
        gaps = lengths[rows, np.asarray(sel.pairs.chosen_idx)[rows]] - lengths[rows, np.asarray(sel.pairs.rejected_idx)[rows]]
        trained = float(gaps.mean()) if rows.size else None
        return dataclasses.replace(sel, stats={**sel.stats, "length_gap_trained": trained})

    def extra_records(self, ctx, rollout, pairs):
        return self.base.extra_records(ctx, rollout, pairs)

    def loss_fn(self, tokenizer):
        return self.base.loss_fn(tokenizer)
