"""LLM-as-a-Judge: prompt templates and score read-outs (SRLM, METHODS 3.4 and section 0; SCIR 5.2).

Two read-outs of the pointwise additive 5-point judge:

- ``"sample"``: K sampled judgments are parsed for their last "Score: k" (:func:`parse_score`) and
  averaged (:func:`aggregate_sampled_scores`); a judgment that does not parse is counted and gives
  no score (NaN), never an exception.
- ``"expected"``: one forward over a prompt that ends right before the score digit
  (:func:`expected_score_prompts`); the score is sum_k k * p(k) over the digit tokens "0".."5",
  renormalised among themselves (:func:`expected_score`).

The pairwise judge for SCIR asks which of two responses is better; :func:`pairwise_preference`
reads p("1") vs p("2") at the verdict position and averages both presentation orders to remove
position bias. The probability functions are plain ``jnp`` (jit/vmap/grad-safe); the templates and
parsing run on the host.

Shape letters: B batch, R responses per prompt, K sampled judgments, V vocab.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

# Our own wording of the additive 5-point rubric (structure of SRLM's Figure 2: five criteria,
# +1 each, a brief justification, then "Score: <points>"). Plain ASCII on purpose: no typographic
# quotes whose tokenization would differ between tokenizers (METHODS 3.4 note).
JUDGE_TEMPLATE = """Evaluate the response to the user's request below with an additive score from 0 to 5 points. Start from 0 and add one point for each criterion the response meets:
- Add 1 point if the response is relevant to the request and offers some useful information, even if it is incomplete or includes some unrelated content.
- Add a 2nd point if the response covers a substantial part of the request, even if it does not fully resolve it or give a direct answer.
- Add a 3rd point if the response answers the essential parts of the request in a useful way, whatever its style or source.
- Add a 4th point if the response is written clearly and directly from an AI assistant's point of view, addresses the request completely, and is well organized and helpful, with at most minor room for improvement in clarity, concision or focus.
- Add a 5th point if the response is excellent: precisely tailored to the request, free of unnecessary content, and shows expert knowledge in an engaging and insightful answer.

User: {instruction}
<response>{response}</response>

First justify your total in at most 100 words. Then finish with a last line of the form "Score: <points>"."""

# A short judge prompt for models with a small context (the embedded tiny LLaMA has 256 positions and
# the full rubric alone is ~800 of its tokens): the criteria are then learned from the EFT examples'
# justifications instead of being read from the prompt.
COMPACT_JUDGE_TEMPLATE = """Rate the response from 0 to 5 points.
User: {instruction}
<response>{response}</response>
Justify, then end with "Score: <points>"."""

JUDGE_TEMPLATES = {"additive": JUDGE_TEMPLATE, "compact": COMPACT_JUDGE_TEMPLATE}

# Pairwise judge (SCIR's generative reward model, METHODS 5.2, [MEM]): the verdict is the first token
# of the assistant's reply, so the logits at the last prompt position hold it.
PAIRWISE_TEMPLATE = """Compare two responses to the user's request below and decide which one is better: more relevant, more correct, more complete, clearer and more helpful.

User: {instruction}
<response 1>{response_1}</response 1>
<response 2>{response_2}</response 2>

Reply with a single digit: 1 if response 1 is better, 2 if response 2 is better."""

SCORE_LABEL = "Score:"
MAX_SCORE = 5

# The last "Score:" label (tolerating markdown emphasis: "**Score:** 3", "**Score**: 3"), then the
# value, then an optional "/5".
_LABEL_RE = re.compile(r"\bscore\s*\**\s*:", re.IGNORECASE)
_VALUE_RE = re.compile(r"\s*\**\s*([+-]?\d+(?:\.\d+)?)(?:\s*/\s*(\d+))?")


def judge_messages(instruction: str, response: str, template: str = "additive") -> list[dict[str, str]]:
    """Chat messages asking the model to score ``response`` to ``instruction`` (one user turn).

    ``template``: "additive" (the five-criteria rubric of SRLM) or "compact" (the same in a few lines).
    """
    if template not in JUDGE_TEMPLATES:
        raise ValueError(f"judge template {template!r} is not one of {', '.join(map(repr, JUDGE_TEMPLATES))}")
    return [{"role": "user", "content": JUDGE_TEMPLATES[template].format(instruction=instruction, response=response)}]


def pairwise_judge_messages(instruction: str, response_1: str, response_2: str) -> list[dict[str, str]]:
    """Chat messages asking which of two responses is better, "1" or "2" (one user turn)."""
    content = PAIRWISE_TEMPLATE.format(instruction=instruction, response_1=response_1, response_2=response_2)
    return [{"role": "user", "content": content}]


def _render(tokenizer: Any, conversations: list[list[dict[str, str]]]) -> list[str]:
    return [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in conversations]


def _check_lengths(fn: str, **lists: Sequence[Any]) -> None:
    lengths = {k: len(v) for k, v in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{fn}: inputs must have one length, got {lengths}")


def render_judge_prompts(tokenizer: Any, instructions: Sequence[str], responses: Sequence[str],
                         template: str = "additive") -> list[str]:
    """Judge prompts as text, through the tokenizer's chat template with the generation prompt.

    Args:
      tokenizer: a ``transformers`` tokenizer with a chat template.
      instructions: B user requests.
      responses: B responses to judge (one per instruction; repeat instructions for R responses).
      template: "additive" or "compact" (:func:`judge_messages`).

    Returns:
      B strings ending where the assistant's judgment starts. They already hold the template's BOS:
      encode them with ``add_special_tokens=False``.
    """
    _check_lengths("render_judge_prompts", instructions=instructions, responses=responses)
    return _render(tokenizer, [judge_messages(i, r, template) for i, r in zip(instructions, responses)])


def render_pairwise_prompts(
    tokenizer: Any, instructions: Sequence[str], responses_1: Sequence[str], responses_2: Sequence[str]
) -> list[str]:
    """Pairwise judge prompts as text, ending where the verdict token is generated."""
    _check_lengths("render_pairwise_prompts", instructions=instructions, responses_1=responses_1, responses_2=responses_2)
    return _render(
        tokenizer, [pairwise_judge_messages(i, a, b) for i, a, b in zip(instructions, responses_1, responses_2)]
    )


def digit_token_ids(tokenizer: Any, label: str = SCORE_LABEL) -> tuple[str, list[int]]:
    """How to write "Score:" so that the next token is the score digit, and the ids of "0".."5".

    Tokenizers differ: a character-level one writes "Score: 4" as ... " ", "4", while BPE ones often
    merge " 4" into one token. This returns the head to force (``"Score: "`` or ``"Score:"``) under
    which each digit k (or " k") is exactly one token that extends the head's tokens.

    Args:
      tokenizer: a ``transformers`` tokenizer.
      label: the score label of the judge template.

    Returns:
      (head text, [6] token ids of the digits 0..5 after it).
    """
    for head, sep in ((label + " ", ""), (label, " ")):
        head_ids = tokenizer.encode(head, add_special_tokens=False)
        ids = []
        for k in range(MAX_SCORE + 1):
            full = tokenizer.encode(f"{head}{sep}{k}", add_special_tokens=False)
            if len(full) != len(head_ids) + 1 or full[: len(head_ids)] != head_ids:
                break
            ids.append(full[-1])
        if len(ids) == MAX_SCORE + 1 and len(set(ids)) == len(ids):
            return head, ids
    raise ValueError(
        f"digit_token_ids: the tokenizer does not write {label!r} + a digit 0..5 with the digit as one token; "
        "use the 'sample' read-out"
    )


def expected_score_prompts(
    tokenizer: Any,
    instructions: Sequence[str],
    responses: Sequence[str],
    judgments: Sequence[str] | None = None,
    template: str = "additive",
) -> tuple[list[str], list[int], int]:
    """Prompts that end right before the score digit, for the one-forward "expected" read-out.

    Each prompt is the rendered judge prompt, then (optionally) the model's own judgment cut right
    before its last "Score:" label (or, without a label, the whole judgment and a newline), then the
    head from :func:`digit_token_ids`.

    Args:
      tokenizer: a ``transformers`` tokenizer with a chat template.
      instructions: B user requests.
      responses: B responses.
      judgments: optional B generated justifications (e.g. greedy); None asks for the score at once.
      template: "additive" or "compact" (:func:`judge_messages`).

    Returns:
      (B prompt strings, the [6] digit token ids for :func:`expected_score`, the number of judgments
      that had no "Score:" label and were used whole).
    """
    prompts = render_judge_prompts(tokenizer, instructions, responses, template)
    head, ids = digit_token_ids(tokenizer)
    if judgments is None:
        return [p + head for p in prompts], ids, 0
    _check_lengths("expected_score_prompts", instructions=instructions, judgments=judgments)
    out, missing = [], 0
    for prompt, text in zip(prompts, judgments):
        labels = list(_LABEL_RE.finditer(text))
        if labels:  # keep the model's own separator (space or newline) before its label
            text = text[: labels[-1].start()]
        else:
            missing += 1
            text = text.rstrip() + "\n" if text.strip() else ""
        out.append(prompt + text + head)
    return out, ids, missing


def parse_score(text: str) -> float | None:
    """The score of a judgment: the value after its last "Score:" label, if it is in 0..5.

    Tolerates case, markdown emphasis and a "/5" suffix ("Score: 4/5", "score:4", "**Score:** 3",
    "Score: 4.5"). Returns None when there is no label, when the last label is not followed by a
    number, when the number is outside [0, 5], or when it is out of another total ("Score: 7/10").
    """
    labels = list(_LABEL_RE.finditer(text))
    if not labels:
        return None
    match = _VALUE_RE.match(text, labels[-1].end())
    if match is None:
        return None
    if match.group(2) is not None and int(match.group(2)) != MAX_SCORE:
        return None
    value = float(match.group(1))
    return value if 0.0 <= value <= MAX_SCORE else None


def aggregate_sampled_scores(scores):
    """Mean of the parsed scores of K sampled judgments per response (SRLM: K = 3, METHODS 3.2).

    Args:
      scores: [B, R, K] float, NaN where a judgment did not parse.

    Returns:
      (mean [B, R] float32 over the parsed judgments, NaN when none parsed; n_failed int32 scalar,
      the number of judgments that did not parse).
    """
    scores = jnp.asarray(scores, jnp.float32)
    if scores.ndim != 3:
        raise ValueError(f"aggregate_sampled_scores: scores must be [B, R, K], got shape {scores.shape}")
    ok = jnp.isfinite(scores)
    n_ok = jnp.sum(ok, axis=-1)
    total = jnp.sum(jnp.where(ok, scores, 0.0), axis=-1)
    mean = jnp.where(n_ok > 0, total / jnp.maximum(n_ok, 1), jnp.nan)
    return mean, jnp.sum(~ok).astype(jnp.int32)


def expected_score(logits, digit_token_ids):
    """Probability-weighted score sum_k k * p(k), p = softmax over the 6 digit tokens "0".."5".

    Args:
      logits: [..., V] next-token logits at the score position (the last position of a prompt from
        :func:`expected_score_prompts`).
      digit_token_ids: [6] int token ids of "0".."5".

    Returns:
      [...] float32 scores in [0, 5].
    """
    ids = jnp.asarray(digit_token_ids)
    if ids.shape != (MAX_SCORE + 1,):
        raise ValueError(f"expected_score: digit_token_ids must hold {MAX_SCORE + 1} ids (0..5), got shape {ids.shape}")
    p = jax.nn.softmax(jnp.take(jnp.asarray(logits, jnp.float32), ids, axis=-1), axis=-1)  # [..., 6]
    return p @ jnp.arange(MAX_SCORE + 1, dtype=jnp.float32)


def verdict_token_ids(tokenizer: Any) -> tuple[int, int]:
    """Token ids of the pairwise verdicts "1" and "2" (each must be a single token)."""
    ids = [tokenizer.encode(v, add_special_tokens=False) for v in ("1", "2")]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"verdict_token_ids: '1' and '2' must be single tokens, got {ids}")
    return ids[0][0], ids[1][0]


def pairwise_preference(logits_12, logits_21, token_1, token_2):
    """p(y1 better than y2) from the pairwise judge, debiased over both presentation orders.

    In each order the verdict probability is renormalised over {"1", "2"}; in the swapped order
    (y2 shown first) "y1 is better" is the verdict "2". The two estimates are averaged.

    Args:
      logits_12: [..., V] verdict logits with y1 shown as response 1.
      logits_21: [..., V] verdict logits with y2 shown as response 1.
      token_1: token id of "1".
      token_2: token id of "2".

    Returns:
      [...] float32 in (0, 1), differentiable in the logits.
    """
    l12 = jnp.asarray(logits_12, jnp.float32)
    l21 = jnp.asarray(logits_21, jnp.float32)
    if l12.shape != l21.shape:
        raise ValueError(f"pairwise_preference: logits_12 {l12.shape} and logits_21 {l21.shape} differ in shape")
    # p("1") among {"1", "2"} = sigmoid(l["1"] - l["2"]).
    p_first = jax.nn.sigmoid(l12[..., token_1] - l12[..., token_2])
    p_swapped = jax.nn.sigmoid(l21[..., token_2] - l21[..., token_1])
    return 0.5 * (p_first + p_swapped)
