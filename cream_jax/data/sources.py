"""Loaders for user data with validation: SFT chats, prompt pools, eval sets, judge-training
examples, preference pairs.

Files are JSON (a dict keyed by uuid, or a list of rows), JSONL (one row per line) or parquet
(read through ``datasets``). Every record is validated; a bad one raises a one-line `DataError`
(a ValueError) naming the file, the record (key, row or line) and what is wrong, or with ``on_error="skip"`` is
dropped and counted. `parse_records` does the same on any iterable of ``(key, record)`` pairs, so
rows of a Hugging Face dataset, mapped into one of these schemas, take the same path.

Accepted schemas (output items in brackets):

* ``"sft"``: CREAM ``{uuid: [{"role": "user", ...}, {"role": "assistant", ...}]}``; rows with
  "messages"; rows with "prompt" and "response"/"completion" strings.
  [{"id", "messages"} (+ "task")] -- optional system turn, then user/assistant turns, ending
  with the assistant.
* ``"prompts"``: CREAM ``{uuid: [{"role": "user", ...}]}``; rows with "prompt" (a string or
  messages) or "messages". [{"id", "messages"} ending with a user turn (+ "task", "answer")]
* ``"eval"``: rows ``{uuid|id, question, label, task?}`` (list, JSONL, or a dict keyed by uuid).
  [{"id", "question", "label" (str), "task"}] -- the task must be known to the verifier
  (`cream_jax.evaluate.TASK_KINDS`); a multiple-choice label must be one of the question's
  options "(A) ... (B) ...", a numeric label a number.
* ``"judge"``: judge-training (EFT) rows ``{id?, instruction, response, score, justification,
  task?, kind?}``: ``score`` an integer 0-5 and ``justification`` the judgment the model should
  write, its last "Score: k" label giving ``score`` (SRLM's additive rubric, METHODS 3.1; the judge
  read-out parses the last label too). [{"id", "instruction", "response", "score" (int), "justification"} (+ "task",
  "kind")]
* ``"pairs"``: rows ``{prompt, chosen, rejected}`` (TRL style: strings, or message lists whose
  last assistant turn is the response); CREAM's DPO file ``{uuid: {"prompt", "selected",
  "rejected", "consistency"}}``. [{"id", "prompt" (messages), "chosen", "rejected"} (+
  "consistency")]
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from cream_jax import evaluate, judge
from cream_jax.errors import DataError

KINDS = ("sft", "prompts", "eval", "judge", "pairs")
ROLES = ("system", "user", "assistant")
ON_ERROR = ("raise", "skip")


def _read_text(path: Path) -> str:
    """UTF-8 text of a file; a bad byte is named by its offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}) "
                        f"({e.reason}); re-encode the file as UTF-8") from None


class Loaded(NamedTuple):
    """Validated items, the number of skipped records and one message per skipped record."""

    items: list[dict]
    n_skipped: int
    errors: list[str]


class _Bad(Exception):
    """A record-level problem; turned into a ValueError (or a skip) with the file and record."""


class _Unparseable(NamedTuple):
    reason: str


def read_records(path: str | Path) -> list[tuple[str, str | None, Any]]:
    """``(where, key, record)`` triples of a .json / .jsonl / .parquet file.

    ``where`` names the record in messages: "key 'uuid'" for a JSON dict, "row i" for a JSON list
    or parquet, "line n" for JSONL (1-based); ``key`` is the dict key (the uuid) or None. A JSONL
    line that is not JSON is reported by `parse_records` like any bad record.
    """
    if not isinstance(path, (str, Path)):
        raise DataError(f"{path!r}: a file path must be a string, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON ({e})") from None
        if isinstance(data, dict):
            return [(f"key {k!r}", k, v) for k, v in data.items()]
        if isinstance(data, list):
            return [(f"row {i}", None, v) for i, v in enumerate(data)]
        raise DataError(f"{path}: top level must be a dict or a list, got {type(data).__name__}")
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(_read_text(path).splitlines(), start=1):
            if line.strip():
                try:
                    out.append((f"line {n}", None, json.loads(line)))
                except json.JSONDecodeError as e:
                    out.append((f"line {n}", None, _Unparseable(str(e))))
        return out
    if suffix == ".parquet":
        import datasets  # lazy: heavy import, only parquet needs it

        rows = datasets.Dataset.from_parquet(str(path))
        return [(f"row {i}", None, dict(row)) for i, row in enumerate(rows)]
    raise DataError(f"{path}: unsupported extension {suffix!r} (use .json, .jsonl or .parquet)")


def _record_id(key: str | None, record: Any, source: str, index: int) -> str:
    """A row's "id"/"uuid" field, else the dict key, else "<source stem>-<index>"."""
    if isinstance(record, dict):
        for field in ("id", "uuid"):
            if field in record:
                value = record[field]
                if isinstance(value, bool) or not isinstance(value, (str, int)):
                    raise _Bad(f"field {field!r} must be a string or an integer, got {type(value).__name__}")
                return str(value)
    return str(key) if key is not None else f"{Path(source).stem}-{index}"


def _text(record: dict, field: str) -> str:
    if field not in record:
        raise _Bad(f"missing field {field!r}")
    value = record[field]
    if not isinstance(value, str):
        raise _Bad(f"field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _Bad(f"field {field!r} is empty")
    return value


def _messages(value: Any, field: str, last: str) -> list[dict]:
    """Validates a chat: optional system turn, alternating user/assistant, ending with ``last``."""
    if not isinstance(value, list) or not value:
        raise _Bad(f"field {field!r} must be a non-empty list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _Bad(f"{field}[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise _Bad(f"{field}[{i}] is missing {key!r}")
        if m["role"] not in ROLES:
            raise _Bad(f"{field}[{i}] has role {m['role']!r}, expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise _Bad(f"{field}[{i}] content must be a string, got {type(m['content']).__name__}")
        if not m["content"].strip():
            raise _Bad(f"{field}[{i}] ({m['role']}) has empty content")
        out.append({"role": m["role"], "content": m["content"]})
    turns = out[1:] if out[0]["role"] == "system" else out
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if [m["role"] for m in turns] != expected or not turns:
        raise _Bad(f"field {field!r} roles {[m['role'] for m in out]} must be [system,] user, assistant, ... alternating")
    if out[-1]["role"] != last:
        raise _Bad(f"field {field!r} must end with role {last!r}, ends with {out[-1]['role']!r}")
    return out


def _response(value: Any, field: str) -> str:
    """A response given as a string, or as messages whose last turn is the assistant's."""
    if isinstance(value, str):
        if not value.strip():
            raise _Bad(f"field {field!r} is empty")
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        content = value[-1].get("content")
        if not isinstance(content, str) or not content.strip():
            raise _Bad(f"field {field!r}: the last (assistant) message has empty or non-string content")
        return content
    raise _Bad(f"field {field!r} must be a string or messages ending with an assistant turn, got {type(value).__name__}")


def _extras(record: dict, item: dict, fields: tuple[str, ...]) -> dict:
    for field in fields:
        if field in record and record[field] is not None:
            value = record[field]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise _Bad(f"field {field!r} must be a string or a number, got {type(value).__name__}")
            item[field] = str(value) if field in ("answer", "task", "label") else value
    return item


def _kind(task: Any) -> str:
    """The verifier's answer kind of a task name ("choice" | "numeric")."""
    try:
        return evaluate.task_kind(task)
    except ValueError:
        raise _Bad(f"task {task!r} is unknown to the verifier (known: {', '.join(sorted(evaluate.TASK_KINDS))}, "
                   f"or a kind {evaluate.KINDS})") from None


def _check_answer(task: str, label: str, question: str | None, field: str) -> None:
    """A numeric label must be a number; a choice label an option letter (of the question's options)."""
    kind = _kind(task)
    if kind == "numeric":
        if evaluate.normalize_number(label) is None:
            raise _Bad(f"field {field!r}={label!r} is not a number (task {task!r} is numeric)")
        return
    letter = evaluate.normalize_label(label, "choice")
    if len(letter) != 1 or not ("A" <= letter <= "E" or "1" <= letter <= "9"):
        raise _Bad(f"field {field!r}={label!r} is not an option letter A-E or number 1-9 (task {task!r} is multiple choice)")
    options = evaluate.parse_options(question) if question else []
    if options:
        index = ord(letter) - ord("A") if letter.isalpha() else int(letter) - 1
        if index >= len(options):
            letters = "".join(chr(ord("A") + i) for i in range(len(options)))
            raise _Bad(f"field {field!r}={label!r} is not one of the question's options ({', '.join(letters)})")


def _parse_sft(record: Any, rid: str) -> dict:
    if isinstance(record, list):
        return {"id": rid, "messages": _messages(record, "messages", "assistant")}
    if "messages" in record:
        item = {"id": rid, "messages": _messages(record["messages"], "messages", "assistant")}
    elif "prompt" in record:
        field = "response" if "response" in record else "completion"
        messages = [{"role": "user", "content": _text(record, "prompt")},
                    {"role": "assistant", "content": _text(record, field)}]
        item = {"id": rid, "messages": messages}
    else:
        raise _Bad("missing field 'messages' (or 'prompt' and 'response')")
    return _extras(record, item, ("task",))


def _parse_prompts(record: Any, rid: str) -> dict:
    if isinstance(record, list):
        return {"id": rid, "messages": _messages(record, "messages", "user")}
    if "messages" in record:
        messages = _messages(record["messages"], "messages", "user")
    elif "prompt" in record:
        prompt = record["prompt"]
        messages = (_messages(prompt, "prompt", "user") if isinstance(prompt, list)
                    else [{"role": "user", "content": _text(record, "prompt")}])
    else:
        raise _Bad("missing field 'prompt' (or 'messages')")
    item = _extras(record, {"id": rid, "messages": messages}, ("task", "answer"))
    if "task" in item:
        _kind(item["task"])
    if "answer" in item:
        if "task" not in item:
            raise _Bad("field 'answer' needs a 'task' (it says how the verifier reads the answer)")
        _check_answer(item["task"], item["answer"], messages[-1]["content"], "answer")
    return item


def _parse_eval(record: dict, rid: str, task: str | None) -> dict:
    question = _text(record, "question")
    if "label" not in record:
        raise _Bad("missing field 'label'")
    label = record["label"]
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        raise _Bad(f"field 'label' must be a non-empty string or an integer, got {label!r}")
    record_task = record.get("task", task)
    if record_task is None:
        raise _Bad("missing field 'task' (or pass task=...)")
    if not isinstance(record_task, str) or not record_task:
        raise _Bad(f"field 'task' must be a non-empty string, got {record_task!r}")
    _check_answer(record_task, str(label).strip(), question, "label")
    return {"id": rid, "question": question, "label": str(label).strip(), "task": record_task}


def _parse_judge(record: dict, rid: str) -> dict:
    item = {"id": rid, "instruction": _text(record, "instruction"), "response": _text(record, "response")}
    if "score" not in record:
        raise _Bad("missing field 'score'")
    score = record["score"]
    # The range test first: it also refuses NaN and inf, which int() cannot convert.
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= judge.MAX_SCORE \
            or score != int(score):
        raise _Bad(f"field 'score' must be an integer 0-{judge.MAX_SCORE}, got {score!r}")
    item["score"] = int(score)
    item["justification"] = _text(record, "justification")
    parsed = judge.parse_score(item["justification"])
    if parsed != item["score"]:
        found = (f"it has no 'Score: k' label with k in 0-{judge.MAX_SCORE} (out of {judge.MAX_SCORE})" if parsed is None
                 else f"its last 'Score:' label says {parsed:g}")
        raise _Bad(f"field 'justification' must give 'Score: {item['score']}' in its last 'Score:' label (what the "
                   f"judge read-out parses); {found}")
    return _extras(record, item, ("task", "kind"))


def _parse_pairs(record: dict, rid: str) -> dict:
    if "prompt" not in record:
        raise _Bad("missing field 'prompt'")
    prompt = record["prompt"]
    if isinstance(prompt, list):
        # CREAM's DPO file stores the prompt as [user]; TRL conversational rows too.
        messages = _messages(prompt, "prompt", "user")
    else:
        messages = [{"role": "user", "content": _text(record, "prompt")}]
    chosen_field = "chosen" if "chosen" in record else "selected"
    for field in (chosen_field, "rejected"):
        if field not in record:
            raise _Bad(f"missing field {'chosen' if field == 'selected' else field!r}")
    item = {"id": rid, "prompt": messages,
            "chosen": _response(record[chosen_field], chosen_field),
            "rejected": _response(record["rejected"], "rejected")}
    consistency = record.get("consistency")
    if consistency is not None:
        if isinstance(consistency, bool) or not isinstance(consistency, (int, float)) or not 0 <= consistency <= 1:
            raise _Bad(f"field 'consistency' must be a number in [0, 1] or null, got {consistency!r}")
        item["consistency"] = float(consistency)
    return item


def parse_records(
    kind: str,
    records: Iterable[tuple[str, str | None, Any]],
    *,
    source: str = "records",
    on_error: str = "raise",
    task: str | None = None,
) -> Loaded:
    """Validates records into items of one schema (see the module docstring).

    Args:
      kind: "sft", "prompts", "eval", "judge" or "pairs".
      records: ``(where, key, record)`` triples: `read_records` output, or
        ``(f"row {i}", None, row)`` for the rows of a mapped HF dataset.
      source: file or dataset name used in error messages and default ids.
      on_error: "raise" (first bad record raises ValueError) or "skip" (drop and count).
      task: eval sets only: task of records that carry none.

    Returns:
      `Loaded` (items, n_skipped, errors).
    """
    if kind not in KINDS:
        raise ValueError(f"parse_records: kind must be one of {KINDS}, got {kind!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"parse_records: on_error must be one of {ON_ERROR}, got {on_error!r}")
    items, errors, seen = [], [], set()
    for index, (where, key, record) in enumerate(records):
        try:
            if isinstance(record, _Unparseable):
                raise _Bad(f"invalid JSON ({record.reason})")
            if not isinstance(record, dict) and not (isinstance(record, list) and kind in ("sft", "prompts")):
                raise _Bad(f"record must be a dict, got {type(record).__name__}")
            rid = _record_id(key, record, source, index)
            if rid in seen:
                raise _Bad(f"duplicate id {rid!r}")
            if kind == "sft":
                item = _parse_sft(record, rid)
            elif kind == "prompts":
                item = _parse_prompts(record, rid)
            elif kind == "eval":
                item = _parse_eval(record, rid, task)
            elif kind == "judge":
                item = _parse_judge(record, rid)
            else:
                item = _parse_pairs(record, rid)
        except _Bad as e:
            message = f"{source}: {where}: {e}"
            if on_error == "raise":
                raise DataError(message) from None
            errors.append(message)
            continue
        seen.add(rid)
        items.append(item)
    return Loaded(items, len(errors), errors)


def _load(kind: str, path: str | Path, on_error: str, task: str | None = None) -> Loaded:
    loaded = parse_records(kind, read_records(path), source=str(path), on_error=on_error, task=task)
    if not loaded.items:
        raise DataError(f"{path}: no valid {kind} records ({loaded.n_skipped} skipped)")
    return loaded


def load_sft_chats(path: str | Path, *, on_error: str = "raise") -> Loaded:
    """SFT chats from CREAM ``{uuid: [user, assistant]}`` JSON or rows with "messages"."""
    return _load("sft", path, on_error)


def load_prompt_pool(path: str | Path, *, on_error: str = "raise") -> Loaded:
    """Prompts from CREAM ``{uuid: [user]}`` JSON or rows with "prompt" / "messages"."""
    return _load("prompts", path, on_error)


def load_eval_set(path: str | Path, *, task: str | None = None, on_error: str = "raise") -> Loaded:
    """Eval items ``{id, question, label, task}``; ``task`` fills records without one."""
    return _load("eval", path, on_error, task)


def load_judge_examples(path: str | Path, *, on_error: str = "raise") -> Loaded:
    """Judge-training (EFT) examples ``{instruction, response, score, justification}`` (SRLM's M1, METHODS 3.1)."""
    return _load("judge", path, on_error)


def load_pairs(path: str | Path, *, on_error: str = "raise") -> Loaded:
    """Preference pairs ``{prompt, chosen, rejected}`` from JSON / JSONL / parquet."""
    return _load("pairs", path, on_error)
