"""Curation, generic over methods: rollout + method -> kept pairs (records) + statistics.

``curate`` runs the method's hooks in the one order every method shares (methods/base.py):
log-prob table -> rewards -> consistency of the same ranker at t and t-1 -> best-vs-worst pairs
-> the method's selection and soft labels -> records for the trainer. Each step is also a
function of plain arrays here, so a notebook can run them one by one.

Shape letters: B prompts, R responses per prompt, T time.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cream_jax import consistency, preference, rewards
from cream_jax.loop.logprobs import LogProbTable
from cream_jax.loop.rollout import Rollout

log = logging.getLogger("cream_jax")


@functools.partial(jax.jit, static_argnames=("method", "level", "ties"))
def _consistency(r_now, r_prev, mask, *, method, level, ties):
    return consistency.consistency_rate(r_now, r_prev, mask, method=method, level=level, ties=ties, return_valid=True)


def consistency_of(r_now: np.ndarray, r_prev: np.ndarray, mask: np.ndarray, *, method: str, level: str, ties: str):
    """(C [B], tau-valid [B]) with the configured metric and level (METHODS 2.3, section 0);
    compiled once per shape, so later iterations reuse it."""
    c, valid = _consistency(jnp.asarray(r_now), jnp.asarray(r_prev), jnp.asarray(mask), method=method, level=level, ties=ties)
    return np.asarray(c, np.float32), np.asarray(valid, bool)


def build_pairs(r_now: np.ndarray, mask: np.ndarray | None, response_tokens: np.ndarray | None,
                response_mask: np.ndarray | None = None) -> preference.Pairs:
    """Best vs worst of the current reward; with ``response_tokens``, identical texts are not paired."""
    return preference.build_pairs(
        jnp.asarray(r_now), None if mask is None else jnp.asarray(mask),
        response_ids=None if response_tokens is None else jnp.asarray(response_tokens),
        response_mask=None if response_mask is None else jnp.asarray(response_mask),
    )


def pair_records(seqs: dict, pairs: Any, ref_logp: np.ndarray, weight: np.ndarray, num_samples: int) -> dict:
    """Host arrays of the kept pairs (``pairs.keep``) in the layout the DPO step reads.

    ``ref_logp [B, R]`` are the DPO reference log-probs, i.e. the current policy's, already computed
    for the rewards (METHODS section 0: no second reference forward). ``weight [B]`` is each
    pair's soft label (``consistency`` in the records: CREAM's C, 1 for plain DPO).
    """
    idx = np.nonzero(np.asarray(pairs.keep))[0]
    chosen, rejected = np.asarray(pairs.chosen_idx)[idx], np.asarray(pairs.rejected_idx)[idx]
    take = lambda name, rows: np.asarray(seqs[name])[rows]  # noqa: E731
    out = {"prompt_index": idx.astype(np.int32)}
    for side, col in (("chosen", chosen), ("rejected", rejected)):
        rows = idx * num_samples + col
        out[f"{side}_ids"], out[f"{side}_mask"] = take("input_ids", rows), take("attention_mask", rows)
        out[f"{side}_resp"] = take("response_mask", rows)
    out["ref_chosen"] = ref_logp[idx, chosen].astype(np.float32)
    out["ref_rejected"] = ref_logp[idx, rejected].astype(np.float32)
    out["consistency"] = np.asarray(weight)[idx].astype(np.float32)
    return out


def _summary(values: np.ndarray | None, defined: np.ndarray | None) -> dict:
    if values is None:
        return {"mean": None, "std": None, "undefined": None}
    c = values[defined] if defined.any() else values
    return {"mean": float(np.mean(c)), "std": float(np.std(c)), "undefined": int((~defined).sum())}


def response_token_stats(token_mask: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, keep: np.ndarray) -> dict:
    """Mean response length in tokens: over every non-empty sampled response ("rollout"), and over
    the kept pairs' chosen and rejected responses (None where there is none), so length drift, the
    bias length control corrects, shows per iteration.

    Args:
      token_mask: [B, R, S] response token mask. chosen, rejected: [B] response indices. keep: [B] bool.
    """
    lengths = np.asarray(token_mask).sum(-1)  # [B, R]
    sampled = lengths[lengths > 0]
    keep = np.asarray(keep, bool)
    rows = np.flatnonzero(keep)

    def mean(values: np.ndarray) -> float | None:
        return float(values.mean()) if values.size else None

    return {"rollout": mean(sampled), "chosen": mean(lengths[rows, np.asarray(chosen)[rows]]),
            "rejected": mean(lengths[rows, np.asarray(rejected)[rows]])}


def curate(method: Any, ctx: Any, rollout: Rollout, logps: LogProbTable, *, num_logged_samples: int = 4) -> tuple[dict, dict]:
    """(records of the kept pairs, statistics) of one iteration.

    Args:
      method: a ``methods.Method``.
      ctx: its ``methods.Context`` at iteration t.
      rollout: M_t's responses.
      logps: the log-prob table, scored under ``method.models_to_score(t)`` already.
      num_logged_samples: prompts whose responses and rewards go into the statistics (for the log).

    Returns:
      (records: host arrays with one row per kept pair, stats: a JSON-ready dict).
    """
    cfg, t = ctx.cfg, ctx.t
    timings: dict[str, float] = {}
    tic = time.perf_counter()
    rw = method.rewards(ctx, rollout, logps)
    valid = rollout.valid & np.isfinite(rw.current)
    r_now = np.nan_to_num(np.asarray(rw.current, np.float32), nan=0.0)
    timings["reward"] = time.perf_counter() - tic

    tic = time.perf_counter()
    c = c_valid = None
    if rw.previous is not None:
        ranker = r_now if rw.ranker is None else np.asarray(rw.ranker, np.float32)
        both = valid & np.isfinite(rw.previous) & np.isfinite(ranker)
        c, c_valid = consistency_of(ranker, np.nan_to_num(np.asarray(rw.previous, np.float32), nan=0.0), both,
                                    method=cfg.reward.consistency_method, level=method.consistency_level, ties=cfg.reward.ties)
    timings["consistency"] = time.perf_counter() - tic
    tic = time.perf_counter()
    dedup = cfg.reward.dedup
    pairs = build_pairs(r_now, valid, rollout.tokens if dedup else None, rollout.token_mask if dedup else None)
    sel = method.select(ctx, rollout, rw, pairs, c)
    b, r = rollout.shape
    records = pair_records(rollout.seqs, sel.pairs, logps[t], sel.weight, r)
    records.update(method.extra_records(ctx, rollout, sel.pairs))
    timings["pairs"] = time.perf_counter() - tic

    keep = np.asarray(sel.pairs.keep, bool)
    reward_acc, reward_acc_pairs = None, 0
    if ctx.oracle is not None:  # on the best-vs-worst pairs of the reward, before any selection
        agreement = rewards.reward_accuracy(jnp.asarray(r_now), jnp.asarray(ctx.oracle), pairs)
        acc = float(agreement.accuracy)
        reward_acc = None if math.isnan(acc) else acc  # no pair with a strict oracle preference
        reward_acc_pairs = int(agreement.n_compared)
    counts = {k: int(v) for k, v in sel.pairs.counts().items()}
    stats = {
        "consistency": _summary(c, c_valid),
        "pairs_kept": int(keep.sum()),
        "pairs_dropped": {k.removeprefix("pairs/dropped_"): v for k, v in counts.items() if k != "pairs/kept"},
        "prompts": b, "prompts_truncated": rollout.prompts_truncated,
        "reward_accuracy": reward_acc, "reward_accuracy_pairs": reward_acc_pairs,
        "judge_parse_failures": rw.judge_parse_failures, "method": {**rw.stats, **sel.stats}, "seconds": timings,
        "response_tokens": response_token_stats(rollout.token_mask, sel.pairs.chosen_idx, sel.pairs.rejected_idx, keep),
        "oracle_mean": None if ctx.oracle is None else float(ctx.oracle[valid].mean()) if valid.any() else None,
        "scored_models": sorted(f"M{k}" for k in logps.scored),
        "samples": [{"prompt": rollout.instructions[i], "responses": rollout.texts[i], "rewards": r_now[i].tolist(),
                     "chosen": int(sel.pairs.chosen_idx[i]), "rejected": int(sel.pairs.rejected_idx[i]), "kept": bool(keep[i])}
                    for i in range(min(b, num_logged_samples))],
    }
    if not keep.any():
        log.warning("iteration %d: no preference pair survived (drops by reason: %s); M_%d is carried over untrained. "
                    "Raise Sampling.temperature or Sampling.num_samples.", t, stats["pairs_dropped"], t)
    return records, stats
