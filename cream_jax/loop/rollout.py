"""The rollout of one iteration: N responses per prompt from M_t, made once and read by every
later stage (log-prob tables, judges, pairs, records, logs).

Shape letters: B prompts, R responses per prompt, P prompt length, S response length, T = P + S.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import numpy as np

from cream_jax.config import DataConfig, SamplingConfig
from cream_jax.data import pipeline
from cream_jax.engine.host import TokenSpec, decode_responses, sample_responses

log = logging.getLogger("cream_jax")


@dataclasses.dataclass(frozen=True)
class Rollout:
    """The prompts of an iteration and M_t's responses to them (host arrays).

    Attributes:
      prompts: B pool items {"id", "messages", "task", "label"}.
      prompt_ids: [B, P] int32, left-padded.
      prompt_mask: [B, P] int32.
      tokens: [B, R, S] int32 response tokens (end-of-turn included, pad after).
      token_mask: [B, R, S] int32.
      seqs: joined (prompt, response) rows {"input_ids", "attention_mask", "response_mask"}: [B * R, T].
      texts: B lists of R decoded responses.
      prompts_truncated: prompts longer than Data.max_prompt_len (left-truncated).
    """

    prompts: list[dict]
    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    tokens: np.ndarray
    token_mask: np.ndarray
    seqs: dict
    texts: list[list[str]]
    prompts_truncated: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        """(B, R)."""
        return self.tokens.shape[0], self.tokens.shape[1]

    @property
    def valid(self) -> np.ndarray:
        """[B, R] bool: the response has at least one token (an empty one cannot be scored)."""
        return self.token_mask.sum(-1) > 0

    @property
    def instructions(self) -> list[str]:
        """The last user message of each prompt (what a judge is shown)."""
        return [p["messages"][-1]["content"] for p in self.prompts]


def encode_pool(tokenizer: Any, pool: list[dict], data: DataConfig, t: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(prompt_ids [B, P], prompt_mask [B, P], number truncated) of a prompt pool."""
    try:
        ids, mask, n_trunc = pipeline.encode_prompts(
            tokenizer, [p["messages"] for p in pool], data.max_prompt_len, on_overflow=data.on_overflow,
            ids=[p["id"] for p in pool],
        )
    except ValueError as e:
        raise ValueError(f"iteration {t} prompts: {e} (Data.max_prompt_len; Data.on_overflow='truncate' cuts instead)") from None
    if n_trunc:
        log.warning("iteration %d: %d of %d prompts were longer than Data.max_prompt_len=%d and were left-truncated",
                    t, n_trunc, len(pool), data.max_prompt_len)
    return np.asarray(ids), np.asarray(mask), int(n_trunc)


def make_rollout(model: Any, tokenizer: Any, pool: list[dict], *, key: jax.Array, sampling: SamplingConfig,
                 data: DataConfig, tokens: TokenSpec, t: int = 0, progress=None) -> Rollout:
    """Samples ``sampling.num_samples`` responses per prompt of ``pool`` from ``model`` (M_t).

    Args:
      model: the policy M_t (a Llama module).
      tokenizer: its tokenizer (chat template).
      pool: B prompt items {"id", "messages", ...}.
      key: PRNG key of the sampler.
      sampling: N, temperature, top-p/k, response length, batch size.
      data: prompt length and overflow policy.
      tokens: end-of-sequence and pad ids.
      t: the iteration (for messages).
      progress: optional wrapper of the batch iterator (a progress bar).

    Returns:
      Rollout.
    """
    if not pool:
        raise ValueError(f"data: the prompt pool of iteration {t} is empty")
    prompt_ids, prompt_mask, n_trunc = encode_pool(tokenizer, pool, data, t)
    s = sampling
    toks, tmask = sample_responses(
        model, prompt_ids, prompt_mask, key=key, num_samples=s.num_samples, max_new_tokens=s.max_new_tokens,
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, tokens=tokens, batch_size=s.batch_size,
        progress=progress, layers=s.layers,
    )
    seqs = {k: np.asarray(v) for k, v in pipeline.join_prompt_response(prompt_ids, prompt_mask, toks, tmask).items()}
    texts = decode_responses(tokenizer, toks, tmask)
    return Rollout(list(pool), prompt_ids, prompt_mask, toks, tmask, seqs, texts, n_trunc)
