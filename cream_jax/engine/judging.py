"""LLM-as-a-Judge read-outs of a model judging responses (SRLM's reward, METHODS 3 and section 0).

Shape letters: B prompts, R responses per prompt, T time.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cream_jax import judge
from cream_jax.engine.host import TokenSpec, batched, decode_responses, encode_texts_left_padded, sample_responses

log = logging.getLogger(__name__)


def _log_parse_failures(what: str, failed: Sequence[str], total: int) -> None:
    """A warning with the count and two examples, so a judge that answers instead of judging shows."""
    if failed:
        log.warning("judge: %d of %d judgments %s; e.g. %s", len(failed), total, what,
                    " | ".join(repr(t[:200]) for t in failed[:2]))


def judge_scores(
    model: Any,
    tokenizer: Any,
    instructions: Sequence[str],
    responses: Sequence[Sequence[str]],
    *,
    readout: str,
    key: jax.Array,
    tokens: TokenSpec,
    max_prompt_len: int,
    max_judgment_tokens: int,
    num_judgments: int,
    batch_size: int,
    template: str = "additive",
    progress=None,
    layers: str = "unroll",
) -> tuple[np.ndarray, int]:
    """Scores ``[B, R]`` in [0, 5] by the model judging its own responses (NaN where unparsed).

    ``"sample"``: K sampled judgments parsed for "Score: k" and averaged. ``"expected"``: a greedy
    judgment, cut at its "Score:" (appended if missing), then one forward: sum_k k * p(k).
    Prompts are padded to the longest one (rounded up to 64 tokens), at most ``max_prompt_len``;
    longer ones lose their beginning, with a warning.
    ``layers``: the judgments' decode program (``Sampling.layers``: "unroll" | "scan").
    Returns (scores, number of parse failures).
    """
    b, r = len(responses), len(responses[0])
    flat_instr = [instructions[i] for i in range(b) for _ in range(r)]
    flat_resp = [responses[i][j] for i in range(b) for j in range(r)]
    prompts = judge.render_judge_prompts(tokenizer, flat_instr, flat_resp, template)
    enc = encode_texts_left_padded(tokenizer, prompts, max_prompt_len, bucket=64, what="judge prompts")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if readout == "sample":
        gen_tok, gen_mask = sample_responses(
            model, ids, mask, key=key, num_samples=num_judgments, max_new_tokens=max_judgment_tokens,
            temperature=0.7, top_p=0.9, top_k=0, tokens=tokens, batch_size=batch_size, progress=progress, layers=layers,
        )
        texts = decode_responses(tokenizer, gen_tok, gen_mask)
        parsed = np.array([[judge.parse_score(t) for t in row] for row in texts], dtype=object)
        scores = np.where(parsed == None, np.nan, parsed).astype(np.float32)  # noqa: E711
        mean, n_failed = judge.aggregate_sampled_scores(scores.reshape(b, r, num_judgments))
        _log_parse_failures("have no parsable 'Score: k' (NaN)", [t for row in texts for t in row if judge.parse_score(t) is None],
                            scores.size)
        return np.asarray(mean, np.float32), int(n_failed)
    # "expected"
    gen_tok, gen_mask = sample_responses(
        model, ids, mask, key=key, num_samples=1, max_new_tokens=max_judgment_tokens, temperature=0.0,
        top_p=1.0, top_k=0, tokens=tokens, batch_size=batch_size, progress=progress, layers=layers,
    )
    judgments = [t[0] for t in decode_responses(tokenizer, gen_tok, gen_mask)]
    forced, digit_ids, n_failed = judge.expected_score_prompts(tokenizer, flat_instr, flat_resp, judgments, template)
    _log_parse_failures("have no 'Score:' label (the score is read after the whole judgment)",
                        [t for t in judgments if not judge._LABEL_RE.search(t)], len(judgments))
    enc = encode_texts_left_padded(tokenizer, forced, ids.shape[1] + max_judgment_tokens + 4,
                                   what="judge prompts with their judgments")
    graphdef, state = nnx.split(model)
    readout = _expected_readout(graphdef)
    digit_ids = jnp.asarray(digit_ids)
    score = batched(model, lambda i, m: readout(state, i, m, digit_ids), [enc["input_ids"], enc["attention_mask"]],
                    batch_size, progress)
    return np.asarray(score, np.float32).reshape(b, r), n_failed


@functools.cache
def _expected_readout(graphdef: Any) -> Callable:
    """One jitted forward per model structure (and shape bucket): the judge's expected score at the
    last position (the LM head runs on that position only, not on all [B, T])."""

    @jax.jit
    def readout(state, input_ids, attention_mask, digit_ids):
        model = nnx.merge(graphdef, state)
        h_btd, _ = model.hidden_states(input_ids, attention_mask)
        return judge.expected_score(model.logits(h_btd[:, -1]), digit_ids)

    return readout
