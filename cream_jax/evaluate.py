"""Downstream accuracy: answer extraction, accuracy, and an evaluation loop over a `generate_fn`.

Two answer extractors (METHODS.md section 0 "Evaluation extraction" and 2.7-6):

* ``"default"`` (fixed): the text after the LAST "The answer is" / "Answer:" / "####" marker
  (case-insensitive) is read: for multiple choice the first option letter A-E (bare upper-case,
  or any case inside parentheses) or option number 1-9; for numeric answers the first number,
  with "$" and thousands commas removed and trailing decimal zeros dropped ("7.00" -> "7").
  No marker -> no prediction (wrong).
* ``"cream_official"``: bug-compatible with the official CREAM ``evaluate.py``: multiple choice
  lower-cases the response, takes the FIRST ``answer:\\s*([a-d])``, else the LAST standalone
  letter a-d anywhere (so the English article "a" reads as option A, and E can never be
  extracted); numeric answers use the first of the markers ``####``, ``###``, ``answer:``,
  ``\\nAnswer`` (never matches after lower-casing), ``answer is`` found in the text and take the
  first number after its first occurrence, else the last number of the text. One deliberate
  difference: the official code raises ``TypeError`` on a non-integral number; here it yields
  ``str(float)``.

This module imports no model code: `evaluate` takes a ``generate_fn(list of message lists) ->
list of str`` (greedy decoding is bound by the caller) and optionally a ``score_fn`` for
multiple choice by option log-likelihood. Shape letters: B batch (prompts), O options.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

# Task name -> answer kind. Real benchmark names are listed so later loaders can reuse them.
TASK_KINDS: dict[str, str] = {
    "arith": "numeric",
    "gsm8k": "numeric",
    "choice": "choice",
    "arc_easy": "choice",
    "arc_challenge": "choice",
    "openbookqa": "choice",
    "siqa": "choice",
}
KINDS = ("choice", "numeric")
EXTRACTORS = ("default", "cream_official")

_MARKER = re.compile(r"the\s+(?:final\s+)?answer\s+is|answer\s*:|####", re.IGNORECASE)
# An option read right after the marker: "(b)", "(B)", "B", "(2)", "2"; bare lower-case letters
# are not options ("The answer is a dog").
_OPTION = re.compile(r"\(\s*([A-Ea-e1-9])\s*\)|(?<![\w$])([A-E1-9])(?![\w])")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_DECIMAL = re.compile(r"-?\d+(?:\.\d+)?")
_OPTION_LIST = re.compile(r"\(([A-E])\)\s*(.*?)\s*(?=\([A-E]\)|$)", re.DOTALL)

# Official CREAM extractor (METHODS 2.7-6).
_OFFICIAL_QA_FIRST = re.compile(r"\banswer:\s*([a-d])\.?\b")
_OFFICIAL_QA_LAST = re.compile(r"\b([a-d])\b")
_OFFICIAL_MATH_MARKERS = ("####", "###", "answer:", "\nAnswer", "answer is")
_OFFICIAL_NUMBER = re.compile(r"-?\d+\.?\d*")


def task_kind(task: str) -> str:
    """Answer kind ("choice" or "numeric") of a task name; a kind name maps to itself."""
    if task in KINDS:
        return task
    if task not in TASK_KINDS:
        raise ValueError(f"task_kind: unknown task {task!r}; known: {sorted(TASK_KINDS)} or a kind {KINDS}")
    return TASK_KINDS[task]


def _check(kind: str, extractor: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"task_kind must be one of {KINDS}, got {kind!r}")
    if extractor not in EXTRACTORS:
        raise ValueError(f"extractor must be one of {EXTRACTORS}, got {extractor!r}")


def normalize_number(text: str) -> str | None:
    """Canonical string of a number: "$1,234.50" -> "1234.5", "7.00" -> "7", "-0" -> "0"."""
    text = text.strip().replace("$", "").replace(",", "")
    if not _DECIMAL.fullmatch(text):
        return None
    sign, body = ("-", text[1:]) if text.startswith("-") else ("", text)
    whole, _, frac = body.partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    out = whole + ("." + frac if frac else "")
    return out if out == "0" else sign + out


def _after_last_marker(response: str) -> str | None:
    matches = list(_MARKER.finditer(response))
    if not matches:
        return None
    return response[matches[-1].end():]


def _extract_default(response: str, kind: str) -> str | None:
    rest = _after_last_marker(response)
    if rest is None:
        return None
    if kind == "choice":
        # The option must sit on the marker's own line: "The answer is Bob.\nA ..." is no answer.
        match = _OPTION.search(rest.split("\n", 1)[0])
        return None if match is None else (match.group(1) or match.group(2)).upper()
    match = _NUMBER.search(rest)
    return None if match is None else normalize_number(match.group(0))


def _official_number(item: str) -> str:
    value = float(item.strip("."))
    return str(int(value)) if value.is_integer() else str(value)


def _extract_official(response: str, kind: str) -> str | None:
    text = response.strip().lower()
    if kind == "choice":
        match = _OFFICIAL_QA_FIRST.search(text)
        if match:
            return match.group(1).upper()
        letters = _OFFICIAL_QA_LAST.findall(text)
        return letters[-1].upper() if letters else None
    for marker in _OFFICIAL_MATH_MARKERS:
        if marker in text:
            # First number of the first segment (after an occurrence of the marker) that has one.
            for segment in text.split(marker)[1:]:
                numbers = _OFFICIAL_NUMBER.findall(segment.replace(",", ""))
                if numbers:
                    return _official_number(numbers[0])
            return None
    numbers = _OFFICIAL_NUMBER.findall(text.replace(",", ""))
    return _official_number(numbers[-1]) if numbers else None


def extract_answer(response: str, task_kind: str, extractor: str = "default") -> str | None:
    """Final answer of one response, or None when none can be read.

    Args:
      response: generated text.
      task_kind: "choice" (returns "A".."E" or "1".."9") or "numeric" (a canonical number string).
      extractor: "default" (fixed) or "cream_official" (bug-compatible, see the module docstring).
    """
    _check(task_kind, extractor)
    if extractor == "default":
        return _extract_default(response, task_kind)
    return _extract_official(response, task_kind)


def normalize_label(label: Any, task_kind: str) -> str:
    """Canonical form of a gold label: "(b)" -> "B", 7 -> "7", "1,000" -> "1000"."""
    text = str(label).strip()
    if task_kind == "choice":
        return text.strip("()").strip().upper()
    return normalize_number(text) or text


def is_correct(response: str, label: Any, task_kind: str, extractor: str = "default") -> bool:
    """Whether the extracted answer equals the label (case-insensitive for "cream_official")."""
    prediction = extract_answer(response, task_kind, extractor)
    if prediction is None:
        return False
    if extractor == "cream_official":
        # The official script compares final.lower() == str(label).lower().
        return prediction.lower() == str(label).lower()
    return prediction == normalize_label(label, task_kind)


def accuracy(responses: Sequence[str], labels: Sequence[Any], task_kind: str, extractor: str = "default") -> float:
    """Fraction of responses whose extracted answer equals the label.

    Args:
      responses: B generated texts.
      labels: B gold labels.
      task_kind: "choice" or "numeric".
      extractor: "default" or "cream_official".
    """
    if len(responses) != len(labels):
        raise ValueError(f"accuracy: {len(responses)} responses but {len(labels)} labels")
    if not responses:
        raise ValueError("accuracy: no responses")
    return float(np.mean([is_correct(r, y, task_kind, extractor) for r, y in zip(responses, labels)]))


def parse_options(question: str) -> list[str]:
    """Option texts of a question written "... (A) Cid (B) Bob (C) Ann", in letter order."""
    start = question.find("(A)")
    if start < 0:
        return []
    return [text for _, text in _OPTION_LIST.findall(question[start:])]


def select_by_likelihood(
    score_fn: Callable[[list[list[dict]], list[list[str]]], Any],
    prompts: list[list[dict]],
    options: list[list[str]],
) -> list[str]:
    """Multiple choice by option log-likelihood: the option with the highest score wins.

    Args:
      score_fn: ``score_fn(prompts, options) -> scores`` with one score per option (e.g. the
        option text's summed or length-normalised log-prob as the assistant response),
        a [B, O] array or a list of B lists.
      prompts: B chat message lists.
      options: B lists of option texts, option i has letter "ABCDE"[i].

    Returns:
      B letters; ties go to the earliest option.
    """
    scores = score_fn(prompts, options)
    if len(scores) != len(prompts):
        raise ValueError(f"select_by_likelihood: score_fn returned {len(scores)} rows for {len(prompts)} prompts")
    letters = []
    for row, opts in zip(scores, options):
        row = np.asarray(row, dtype=np.float64)
        if row.shape != (len(opts),):
            raise ValueError(f"select_by_likelihood: score row has shape {row.shape}, expected ({len(opts)},)")
        letters.append("ABCDE"[int(np.argmax(row))])
    return letters


def _group_by_task(eval_sets: Mapping[str, Sequence[dict]] | Sequence[dict]) -> dict[str, list[dict]]:
    if isinstance(eval_sets, Mapping):
        return {task: list(items) for task, items in eval_sets.items()}
    groups: dict[str, list[dict]] = {}
    for i, item in enumerate(eval_sets):
        if "task" not in item:
            raise ValueError(f"evaluate: eval item {i} has no 'task' field (pass a dict task -> items instead)")
        groups.setdefault(item["task"], []).append(item)
    return groups


def _batched(fn: Callable[[list], list], inputs: list, batch_size: int) -> list:
    """Calls ``fn`` on consecutive chunks of at most ``batch_size`` inputs; the last one is not
    padded here: the engine pads a short batch only to its mesh bucket (`cream_jax.engine.batching`),
    so a 10-item set with a batch size of 128 runs 10 rows rounded up to what the mesh allows, and
    the shapes a jitted ``fn`` sees repeat from one evaluation to the next (no recompiles)."""
    outputs: list = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        result = list(fn(chunk))
        if len(result) != len(chunk):
            raise ValueError(f"evaluate: callable returned {len(result)} outputs for a batch of {len(chunk)}")
        outputs.extend(result)
    return outputs


def _prompt(task: str, item: Mapping, suffix: str) -> list[dict]:
    """The chat of an eval item: its "messages", else one user turn with its "question"; the
    suffix is appended to the last (user) turn."""
    if "messages" in item:
        messages = [dict(m) for m in item["messages"]]
    elif "question" in item:
        messages = [{"role": "user", "content": item["question"]}]
    else:
        raise ValueError(f"evaluate: item {item.get('id')!r} of {task!r} has neither 'question' nor 'messages'")
    messages[-1]["content"] += suffix
    return messages


def evaluate(
    generate_fn: Callable[[list[list[dict]]], list[str]],
    eval_sets: Mapping[str, Sequence[dict]] | Sequence[dict],
    batch_size: int,
    *,
    extractor: str = "default",
    suffix: str = "",
    score_fn: Callable[[list[list[dict]], list[list[str]]], Any] | None = None,
    return_outputs: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, list[dict]]]:
    """Accuracy per task of greedy generations on held-out sets.

    Args:
      generate_fn: maps a list of chat message lists to as many texts; each call gets at most
        ``batch_size`` prompts (the last call of a set the rest, unpadded: the engine's
        `cream_jax.engine.host.sample_responses` pads it to its mesh bucket).
      eval_sets: ``{task: [{"id", "question", "label"}, ...]}`` or a flat list of items with "task";
        an item may give its prompt as "messages" (a chat ending with the user turn) instead.
      batch_size: maximum prompts per call of ``generate_fn`` / ``score_fn``.
      extractor: "default" or "cream_official".
      suffix: appended to every question (e.g. CREAM's "\\nAnswer the question by thinking step by
        step. ..." instruction); empty for the embedded suite, whose format is learned in SFT.
      score_fn: if given, multiple-choice tasks are answered by `select_by_likelihood` over the
        options parsed from the question (or an item's "options" list) instead of by generation.
      return_outputs: also return, per task, one record per item {id, question (the prompt's last
        user turn), response, prediction, label, correct} ("response" is None for likelihood-scored items).

    Returns:
      ``{task: accuracy}`` (and the per-item records if ``return_outputs``).
    """
    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    results: dict[str, float] = {}
    records: dict[str, list[dict]] = {}
    for task, items in _group_by_task(eval_sets).items():
        if not items:
            raise ValueError(f"evaluate: eval set {task!r} is empty")
        kind = task_kind(task)
        prompts = [_prompt(task, item, suffix) for item in items]
        if score_fn is not None and kind == "choice":
            options = [list(item.get("options") or parse_options(p[-1]["content"])) for item, p in zip(items, prompts)]
            for item, opts in zip(items, options):
                if len(opts) < 2:
                    raise ValueError(f"evaluate: item {item.get('id')!r} of {task!r} has fewer than 2 options")
            pairs = list(zip(prompts, options))
            predictions = _batched(
                lambda chunk: select_by_likelihood(score_fn, [p for p, _ in chunk], [o for _, o in chunk]),
                pairs,
                batch_size,
            )
            responses = [None] * len(items)
            correct = [p == normalize_label(item["label"], kind) for p, item in zip(predictions, items)]
        else:
            responses = _batched(generate_fn, prompts, batch_size)
            predictions = [extract_answer(r, kind, extractor) for r in responses]
            correct = [is_correct(r, item["label"], kind, extractor) for r, item in zip(responses, items)]
        results[task] = float(np.mean(correct))
        records[task] = [
            {"id": item.get("id"), "question": prompt[-1]["content"], "response": r, "prediction": p,
             "label": item["label"], "correct": bool(c)}
            for item, prompt, r, p, c in zip(items, prompts, responses, predictions, correct)
        ]
    return (results, records) if return_outputs else results
