"""One iteration's self-rewarding data: sample, score, reward, consistency, pairs.

Each function works on plain arrays and a model, so a notebook can run the stages one by one.
The trainer calls :func:`curate` which chains them for one prompt subset and returns host arrays
ready for the preference-training stage.

Shape letters: B prompts, R responses per prompt, T time (prompt + response), S response length.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cream_jax import consistency, judge, preference, rewards
from cream_jax.sampling import generate
from cream_jax.scoring import sequence_logprobs

log = logging.getLogger("cream_jax")


@dataclasses.dataclass
class TokenSpec:
    """Token ids the loop needs from the tokenizer."""

    eos_ids: tuple[int, ...]
    pad_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "TokenSpec":
        eos = []
        if tokenizer.eos_token_id is not None:
            eos.append(int(tokenizer.eos_token_id))
        for special in ("<|eot_id|>", "<|im_end|>", "<|end_of_turn|>"):
            tid = tokenizer.convert_tokens_to_ids(special) if special in tokenizer.get_vocab() else None
            if tid is not None and tid not in eos:
                eos.append(int(tid))
        if not eos:
            raise ValueError("tokenizer: no eos_token_id and no end-of-turn token; cannot stop generation")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        return cls(eos_ids=tuple(eos), pad_id=int(pad))


def encode_texts_left_padded(tokenizer: Any, texts: Sequence[str], max_len: int, *, bucket: int | None = None,
                             what: str = "texts") -> dict:
    """Tokenizes already-rendered texts (no template), keeps the last ``max_len`` tokens, left-pads.

    ``bucket``: pad only to the longest text rounded up to a multiple of it (few shapes to compile),
    still at most ``max_len``. Texts that are cut lose their beginning, with a warning naming ``what``.
    """
    rows = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    if bucket:
        max_len = min(max_len, -(-max((len(r) for r in rows), default=1) // bucket) * bucket)
    ids = np.full((len(texts), max_len), tokenizer.pad_token_id or 0, np.int32)
    mask = np.zeros((len(texts), max_len), np.int32)
    for i, toks in enumerate(rows):
        toks = toks[-max_len:]
        ids[i, max_len - len(toks):] = toks
        mask[i, max_len - len(toks):] = 1
    cut = sum(len(r) > max_len for r in rows)
    if cut:
        log.warning("%d of %d %s were longer than %d tokens and lost their beginning", cut, len(texts), what, max_len)
    return {"input_ids": ids, "attention_mask": mask}


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """Pads the leading axis to ``rows`` by repeating row 0 (outputs of pad rows are dropped)."""
    if x.shape[0] == rows:
        return x
    return np.concatenate([x, np.repeat(x[:1], rows - x.shape[0], axis=0)], axis=0)


def batched(fn: Callable[..., Any], arrays: Sequence[np.ndarray], batch_size: int, progress=None) -> list[Any]:
    """Runs ``fn`` over fixed-size slices of host arrays (the last one padded), one static shape."""
    n = arrays[0].shape[0]
    outs = []
    starts = range(0, n, batch_size)
    for start in progress(starts) if progress else starts:
        chunk = [_pad_rows(a[start:start + batch_size], batch_size) for a in arrays]
        take = min(batch_size, n - start)
        out = fn(*chunk)
        outs.append(jax.tree.map(lambda x: np.asarray(x)[:take], out))
    return outs


def _cat(outs: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *outs)


def sample_responses(
    model: Any,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    *,
    key: jax.Array,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    tokens: TokenSpec,
    batch_size: int,
    progress=None,
) -> tuple[np.ndarray, np.ndarray]:
    """N responses per prompt: ``(tokens [B, R, S], mask [B, R, S])`` on the host."""
    counter = iter(range(1 << 30))

    def one(ids, mask):
        return generate(
            model, ids, mask, key=jax.random.fold_in(key, next(counter)), num_samples=num_samples,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            eos_id=tokens.eos_ids, pad_id=tokens.pad_id,
        )

    return _cat(batched(one, [prompt_ids, prompt_mask], batch_size, progress))


def score_sequences(model: Any, seqs: dict, batch_size: int, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs and token counts of every joined (prompt, response) row."""

    def one(ids, mask, resp):
        return sequence_logprobs(model, ids, mask, resp)

    arrays = [seqs["input_ids"], seqs["attention_mask"], seqs["response_mask"]]
    return _cat(batched(one, arrays, batch_size, progress))


def decode_responses(tokenizer: Any, tokens: np.ndarray, mask: np.ndarray) -> list[list[str]]:
    """Texts of ``tokens [B, R, S]`` (special tokens such as end-of-turn dropped)."""
    b, r, _ = tokens.shape
    return [
        [tokenizer.decode(tokens[i, j][mask[i, j] > 0].tolist(), skip_special_tokens=True) for j in range(r)]
        for i in range(b)
    ]


# ------------------------------------------------------------------------------------------
# LLM-as-a-Judge rewards (SRLM, METHODS 3 and section 0).


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
) -> tuple[np.ndarray, int]:
    """Scores ``[B, R]`` in [0, 5] by the model judging its own responses (NaN where unparsed).

    ``"sample"``: K sampled judgments parsed for "Score: k" and averaged. ``"expected"``: a greedy
    judgment, cut at its "Score:" (appended if missing), then one forward: sum_k k * p(k).
    Prompts are padded to the longest one (rounded up to 64 tokens), at most ``max_prompt_len``;
    longer ones lose their beginning, with a warning.
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
            temperature=0.7, top_p=0.9, top_k=0, tokens=tokens, batch_size=batch_size, progress=progress,
        )
        texts = decode_responses(tokenizer, gen_tok, gen_mask)
        parsed = np.array([[judge.parse_score(t) for t in row] for row in texts], dtype=object)
        scores = np.where(parsed == None, np.nan, parsed).astype(np.float32)  # noqa: E711
        mean, n_failed = judge.aggregate_sampled_scores(scores.reshape(b, r, num_judgments))
        return np.asarray(mean, np.float32), int(n_failed)
    # "expected"
    gen_tok, gen_mask = sample_responses(
        model, ids, mask, key=key, num_samples=1, max_new_tokens=max_judgment_tokens, temperature=0.0,
        top_p=1.0, top_k=0, tokens=tokens, batch_size=batch_size, progress=progress,
    )
    judgments = [t[0] for t in decode_responses(tokenizer, gen_tok, gen_mask)]
    forced, digit_ids, n_failed = judge.expected_score_prompts(tokenizer, flat_instr, flat_resp, judgments, template)
    enc = encode_texts_left_padded(tokenizer, forced, ids.shape[1] + max_judgment_tokens + 4,
                                   what="judge prompts with their judgments")
    graphdef, state = nnx.split(model)
    readout = _expected_readout(graphdef)
    digit_ids = jnp.asarray(digit_ids)
    score = _cat(batched(lambda i, m: readout(state, i, m, digit_ids), [enc["input_ids"], enc["attention_mask"]],
                         batch_size, progress))
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


# ------------------------------------------------------------------------------------------
# From rewards to training records.


def implicit_reward(logp_model: np.ndarray, logp_ref: np.ndarray | None, n_tokens: np.ndarray) -> np.ndarray:
    """``logp_model - logp_ref`` (CREAM 2.2-b: no beta, ranking is invariant to it); a model with no
    reference (M0) ranks by its length-normalised likelihood (CREAM 2.7-1)."""
    if logp_ref is None:
        return np.asarray(rewards.likelihood(logp_model, n_tokens))
    return np.asarray(rewards.implicit(logp_model, logp_ref))


def pair_records(
    seqs: dict,
    pairs: Any,
    keep: np.ndarray,
    ref_logp: np.ndarray,
    weight_c: np.ndarray,
    num_samples: int,
) -> dict:
    """Host arrays of the kept pairs in the layout the DPO step reads.

    ``ref_logp [B, R]`` are the DPO reference log-probs, i.e. the current policy's, already computed
    for the implicit reward (METHODS section 0: no second reference forward).
    """
    idx = np.nonzero(keep)[0]
    chosen_rows = idx * num_samples + np.asarray(pairs.chosen_idx)[idx]
    rejected_rows = idx * num_samples + np.asarray(pairs.rejected_idx)[idx]
    take = lambda name, rows: np.asarray(seqs[name])[rows]  # noqa: E731
    return {
        "prompt_index": idx.astype(np.int32),
        "chosen_ids": take("input_ids", chosen_rows),
        "chosen_mask": take("attention_mask", chosen_rows),
        "chosen_resp": take("response_mask", chosen_rows),
        "rejected_ids": take("input_ids", rejected_rows),
        "rejected_mask": take("attention_mask", rejected_rows),
        "rejected_resp": take("response_mask", rejected_rows),
        "ref_chosen": ref_logp[idx, np.asarray(pairs.chosen_idx)[idx]].astype(np.float32),
        "ref_rejected": ref_logp[idx, np.asarray(pairs.rejected_idx)[idx]].astype(np.float32),
        "consistency": weight_c[idx].astype(np.float32),
    }


@functools.partial(jax.jit, static_argnames=("method", "level", "ties"))
def _consistency(r_now, r_prev, mask, *, method, level, ties):
    return consistency.consistency_rate(r_now, r_prev, mask, method=method, level=level, ties=ties, return_valid=True)


def consistency_of(r_now: np.ndarray, r_prev: np.ndarray, mask: np.ndarray, *, method: str, level: str, ties: str):
    """(C [B], tau-valid [B]) with the configured metric and level (METHODS 2.3, section 0);
    compiled once per shape, so later iterations reuse it."""
    c, valid = _consistency(jnp.asarray(r_now), jnp.asarray(r_prev), jnp.asarray(mask), method=method, level=level, ties=ties)
    return np.asarray(c, np.float32), np.asarray(valid, bool)


def build_pairs(r_now: np.ndarray, mask: np.ndarray | None, response_tokens: np.ndarray | None,
                response_mask: np.ndarray | None = None) -> Any:
    """Best vs worst of the current reward; with ``response_tokens``, identical texts are not paired."""
    return preference.build_pairs(
        jnp.asarray(r_now), None if mask is None else jnp.asarray(mask),
        response_ids=None if response_tokens is None else jnp.asarray(response_tokens),
        response_mask=None if response_mask is None else jnp.asarray(response_mask),
    )
