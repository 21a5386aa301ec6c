"""The CREAM paper's datasets in their published Hugging Face schemas, as cream_jax records.

Each dataset comes by its hub name through ``datasets.load_dataset`` (where a hub or a cached
copy is reachable), by a local ``.json`` / ``.jsonl`` / ``.parquet`` file or a dataset folder
(through ``datasets.load_dataset("json" | "parquet", data_files=...)``), or, with
``backend="tfds"``, through tensorflow-datasets (the ``tfds`` extra). Rows are mapped into the
records of `cream_jax.data.sources` and validated there:

* eval items ``{"id", "question", "label", "task"}`` for `cream_jax.evaluate.evaluate`, with
  the options inside the question as ``"<question>\\n(A) <text>\\n(B) <text> ..."`` (the form
  `cream_jax.evaluate.parse_options` reads) and the label a letter, or for GSM8K a number;
* SFT chats ``{"id", "messages": [user, assistant]}`` and prompt pools ``{"id", "messages":
  [user]}`` from Open Assistant message trees.

Schemas (HF name, the split the paper reports, what is mapped):

  arc_easy / arc_challenge  ``allenai/ai2_arc`` ARC-Easy / ARC-Challenge, test: id, question,
      choices {text[], label[]}, answerKey. A few ARC rows label their options "1".."5" instead
      of "A".."E"; those are mapped to letters ("1" -> "A", ..., as tfds' ai2_arc builder does),
      so every question reads (A), (B), ... and every label is a letter.
  openbookqa  ``allenai/openbookqa`` main, test: id, question_stem, choices {text, label},
      answerKey.
  siqa  ``allenai/social_i_qa``, validation (the test labels are not public): context,
      question, answerA/B/C, label "1".."3" -> "A".."C". Rows have no id: "siqa-<row>".
  gsm8k  ``openai/gsm8k`` main, test: question, answer (worked solution ending in
      "#### <final answer>"); the label is the number after the last "####", commas removed.
      Rows have no id: "gsm8k-<row>".
  oasst_sft / oasst_prompts  ``OpenAssistant/oasst1``, train: one row per message of a
      conversation tree (message_id, parent_id, role "prompter" | "assistant", text, lang, rank,
      deleted, review_result, ...). Kept: first turns, i.e. root prompter messages (parent_id
      null) in the wanted language (English by default), not deleted and not rejected in
      review. SFT pairs a root with its best-ranked assistant reply (rank 0 is best; unranked
      replies only when none is ranked, the first in file order); the prompt pool takes every
      kept root. CREAM's seed set is such (user, assistant) pairs (METHODS.md 2.5).

Malformed rows raise a one-line ValueError naming the source (file or ``name[subset/split]``),
the row (0-based dataset row; a JSONL file's row i is its (i+1)-th non-empty line) and the
problem, or with ``on_error="skip"`` are dropped and counted, as in `cream_jax.data.sources`.

`as_prompts` turns eval items into a prompt pool (CREAM's unlabeled prompts mix OASST prompts
with train-split questions of the five tasks, labels dropped, METHODS.md 2.5), and
``python -m cream_jax.data.hf_datasets NAME --out FILE`` writes any of these as a JSON / JSONL
file that the trainer's ``Data.*`` paths read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cream_jax.data.sources import ON_ERROR, Loaded, parse_records
from cream_jax.evaluate import normalize_number

LETTERS = "ABCDE"
BACKENDS = ("datasets", "tfds")
_LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class _Bad(Exception):
    """A row-level problem; becomes a ValueError (or a skip) naming the source and row."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and what it becomes.

    Attributes:
      hub: Hugging Face hub name.
      subset: hub config name (None for the default one).
      split: the split the CREAM paper uses.
      kind: the record kind it maps to: "eval", "sft" or "prompts".
      tfds: tensorflow-datasets name (None: not in tfds with a schema this module knows).
    """

    hub: str
    subset: str | None
    split: str
    kind: str
    tfds: str | None


DATASETS: dict[str, DatasetSpec] = {
    "arc_easy": DatasetSpec("allenai/ai2_arc", "ARC-Easy", "test", "eval", "ai2_arc/ARC-Easy"),
    "arc_challenge": DatasetSpec("allenai/ai2_arc", "ARC-Challenge", "test", "eval", "ai2_arc/ARC-Challenge"),
    "openbookqa": DatasetSpec("allenai/openbookqa", "main", "test", "eval", "openbookqa"),
    # tfds has no native Social IQa; its Hugging Face bridge yields the hub schema unchanged.
    "siqa": DatasetSpec("allenai/social_i_qa", None, "validation", "eval", "huggingface:social_i_qa"),
    "gsm8k": DatasetSpec("openai/gsm8k", "main", "test", "eval", "gsm8k"),
    "oasst_sft": DatasetSpec("OpenAssistant/oasst1", None, "train", "sft", None),
    "oasst_prompts": DatasetSpec("OpenAssistant/oasst1", None, "train", "prompts", None),
}
EVAL_TASKS = tuple(name for name, spec in DATASETS.items() if spec.kind == "eval")


# ------------------------------------------------------------------------------------------
# Reading rows: hub name, local file or folder (datasets), or tfds.


def _first_line(e: BaseException) -> str:
    # datasets hides the parse error of a local file (pyarrow's "... in row 1") in the cause.
    if type(e).__name__ == "DatasetGenerationError" and e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def _looks_like_path(source: str) -> bool:
    return Path(source).suffix.lower() in _LOCAL_SUFFIXES or source.startswith((".", "/", "~")) or "\\" in source


def _read_datasets(source: str, subset: str | None, split: str) -> tuple[str, list[dict]]:
    import datasets  # noqa: PLC0415 - heavy import, only needed here

    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in _LOCAL_SUFFIXES:
            raise ValueError(f"{path}: unsupported extension {suffix!r} (use .json, .jsonl or .parquet)")
        name, load = str(path), lambda: datasets.load_dataset(_LOCAL_SUFFIXES[suffix], data_files=str(path), split="train")
    elif path.is_dir():
        name, load = f"{path}[{split}]", lambda: datasets.load_dataset(str(path), subset, split=split)
    elif _looks_like_path(source):
        raise ValueError(f"{source}: no such file or folder")
    else:
        name = f"{source}[{subset + '/' if subset else ''}{split}]"
        try:
            return name, [dict(row) for row in datasets.load_dataset(source, subset, split=split)]
        except Exception as e:  # noqa: BLE001 - every hub failure gets the same advice
            raise ValueError(
                f"{name}: cannot load from the Hugging Face hub ({_first_line(e)}); offline (HF_HUB_OFFLINE=1 or no "
                f"network) needs a cached copy; else pass a local .json/.jsonl/.parquet path or dataset folder"
            ) from None
    try:
        return name, [dict(row) for row in load()]
    except Exception as e:  # noqa: BLE001 - unreadable file: one line naming it
        raise ValueError(f"{name}: cannot be read by datasets ({_first_line(e)})") from None


def _plain(value: Any) -> Any:
    """tfds numpy output -> Python values: bytes -> str, arrays -> lists, numpy scalars -> numbers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.ndim else _plain(value.item())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _read_tfds(name: str, split: str) -> tuple[str, list[dict]]:
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415 - optional extra
    except ImportError:
        raise ValueError("backend='tfds' needs tensorflow-datasets: pip install cream_jax[tfds]") from None
    where = f"tfds {name}[{split}]"
    try:
        ds = tfds.load(name, split=split)
        return where, [_plain(example) for example in tfds.as_numpy(ds)]
    except Exception as e:  # noqa: BLE001 - tfds raises many types
        raise ValueError(f"{where}: cannot load ({_first_line(e)})") from None


def _class_label(value: Any, names: str) -> Any:
    """A tfds ClassLabel index -> its name (other values unchanged, for the mapper to judge)."""
    return names[value] if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names) else value


def _tfds_arc(row: dict) -> dict:
    # tfds' ai2_arc stores option labels and answerKey as ClassLabel indices over "ABCDE".
    choices = row.get("choices") or {}
    labels = [_class_label(i, LETTERS) for i in choices.get("label", [])]
    return {**row, "choices": {**choices, "label": labels}, "answerKey": _class_label(row.get("answerKey"), LETTERS)}


def _tfds_openbookqa(row: dict) -> dict:
    # tfds' openbookqa: question {stem, choice_A..choice_D}, answerKey a ClassLabel over "ABCD", no id.
    q = row.get("question") or {}
    letters = [c for c in "ABCD" if f"choice_{c}" in q]
    return {
        "question_stem": q.get("stem"),
        "choices": {"text": [q[f"choice_{c}"] for c in letters], "label": letters},
        "answerKey": _class_label(row.get("answerKey"), "ABCD"),
    }


_TFDS_ADAPTERS: dict[str, Callable[[dict], dict]] = {
    "arc_easy": _tfds_arc, "arc_challenge": _tfds_arc, "openbookqa": _tfds_openbookqa,
}


def load_rows(
    source: str,
    *,
    subset: str | None = None,
    split: str = "train",
    backend: str = "datasets",
) -> tuple[str, list[dict]]:
    """Raw rows of a dataset, and the name that error messages use for it.

    Args:
      source: a hub name ("allenai/ai2_arc"), a local .json/.jsonl/.parquet file (read whole,
        ``subset``/``split`` ignored), a local dataset folder (``split`` picks its files), or for
        ``backend="tfds"`` a tfds name ("ai2_arc/ARC-Easy").
      subset: hub config name.
      split: split to read.
      backend: "datasets" or "tfds" (needs ``pip install cream_jax[tfds]``).

    Returns:
      ``(name, rows)``: e.g. ``("allenai/ai2_arc[ARC-Easy/test]", [dict, ...])``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"load_rows: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "tfds":
        return _read_tfds(source, split)
    return _read_datasets(source, subset, split)


# ------------------------------------------------------------------------------------------
# Row mappers: one published schema -> one record (raise _Bad on a malformed row).


def _field(row: dict, name: str) -> Any:
    if name not in row or row[name] is None:
        raise _Bad(f"missing field {name!r}")
    return row[name]


def _string(row: dict, name: str) -> str:
    value = _field(row, name)
    if not isinstance(value, str):
        raise _Bad(f"field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _Bad(f"field {name!r} is empty")
    return value.strip()


def _letter(label: Any, field: str, n: int) -> str:
    """An option label as a letter: "A".."E" as is, "1".."5" (ARC's numeric labels) -> "A".."E"."""
    text = "" if isinstance(label, bool) or not isinstance(label, (str, int)) else str(label).strip().upper()
    if len(text) == 1 and text in LETTERS[:n]:
        return text
    if text.isdigit() and 1 <= int(text) <= n:
        return LETTERS[int(text) - 1]
    raise _Bad(f"field {field!r} is {label!r}, not an option label (A-{LETTERS[n - 1]} or 1-{n})")


def format_choices(question: str, options: Sequence[str]) -> str:
    """``"<question>\\n(A) <option 0>\\n(B) <option 1> ..."``: the question text evaluation reads."""
    return question + "".join(f"\n({LETTERS[i]}) {text}" for i, text in enumerate(options))


def _options(row: dict, choices_field: str = "choices") -> tuple[list[str], list[str]]:
    choices = _field(row, choices_field)
    if not isinstance(choices, dict) or not isinstance(choices.get("text"), list) or not isinstance(choices.get("label"), list):
        raise _Bad(f"field {choices_field!r} must be {{'text': [...], 'label': [...]}}, got {choices!r}"[:200])
    texts, labels = choices["text"], choices["label"]
    if len(texts) != len(labels) or not 2 <= len(texts) <= len(LETTERS):
        raise _Bad(f"field {choices_field!r} has {len(texts)} texts and {len(labels)} labels (need 2-5 of each, equal)")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise _Bad(f"{choices_field}.text[{i}] must be a non-empty string, got {text!r}")
    letters = [_letter(label, f"{choices_field}.label[{i}]", len(labels)) for i, label in enumerate(labels)]
    # Options are shown and scored in letter order, so the labels must run A, B, C, ...
    if letters != list(LETTERS[: len(letters)]):
        raise _Bad(f"{choices_field}.label {labels} is not in order A, B, C, ... (or 1, 2, 3, ...)")
    return [t.strip() for t in texts], letters


def _arc(row: dict, index: int, task: str) -> dict:
    texts, letters = _options(row)
    return {"id": _field(row, "id"), "question": format_choices(_string(row, "question"), texts),
            "label": _letter(_field(row, "answerKey"), "answerKey", len(letters)), "task": task}


def _openbookqa(row: dict, index: int, task: str) -> dict:
    texts, letters = _options(row)
    rid = row.get("id") if row.get("id") is not None else f"{task}-{index}"
    return {"id": rid, "question": format_choices(_string(row, "question_stem"), texts),
            "label": _letter(_field(row, "answerKey"), "answerKey", len(letters)), "task": task}


def _siqa(row: dict, index: int, task: str) -> dict:
    texts = [_string(row, f"answer{c}") for c in "ABC"]
    question = f"{_string(row, 'context')}\n{_string(row, 'question')}"
    return {"id": f"{task}-{index}", "question": format_choices(question, texts),
            "label": _letter(_field(row, "label"), "label", 3), "task": task}


def _gsm8k(row: dict, index: int, task: str) -> dict:
    answer = _string(row, "answer")
    if "####" not in answer:
        raise _Bad("field 'answer' has no '#### <final answer>'")
    final = answer.rsplit("####", 1)[1].strip()
    label = normalize_number(final)
    if label is None:
        raise _Bad(f"field 'answer': the final answer {final!r} after '####' is not a number")
    return {"id": f"{task}-{index}", "question": _string(row, "question"), "label": label, "task": task}


_EVAL_MAPPERS: dict[str, Callable[[dict, int, str], dict]] = {
    "arc_easy": _arc, "arc_challenge": _arc, "openbookqa": _openbookqa, "siqa": _siqa, "gsm8k": _gsm8k,
}


def _check_on_error(on_error: str, who: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"{who}: on_error must be one of {ON_ERROR}, got {on_error!r}")


def _map_rows(
    rows: Iterable[dict], mapper: Callable[[dict, int], dict], source: str, on_error: str
) -> tuple[list[tuple[str, None, dict]], list[str]]:
    """Maps rows into records; a bad row raises ValueError or is dropped and reported."""
    records, errors = [], []
    for index, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise _Bad(f"row must be a dict, got {type(row).__name__}")
            records.append((f"row {index}", None, mapper(row, index)))
        except _Bad as e:
            message = f"{source}: row {index}: {e}"
            if on_error == "raise":
                raise ValueError(message) from None
            errors.append(message)
    return records, errors


def _validated(kind: str, records: list, errors: list[str], source: str, on_error: str, task: str | None = None) -> Loaded:
    loaded = parse_records(kind, records, source=source, on_error=on_error, task=task)
    errors = errors + loaded.errors
    if not loaded.items:
        raise ValueError(f"{source}: no valid {kind} records ({len(errors)} skipped)")
    return Loaded(loaded.items, len(errors), errors)


def eval_items(task: str, rows: Iterable[dict], *, source: str = "rows", on_error: str = "raise") -> Loaded:
    """Maps rows of a benchmark's published schema into eval items (see the module docstring).

    Args:
      task: one of `EVAL_TASKS` ("arc_easy", "arc_challenge", "openbookqa", "siqa", "gsm8k").
      rows: dicts in that benchmark's Hugging Face schema.
      source: name of the file or dataset, used in error messages.
      on_error: "raise" (first bad row raises ValueError) or "skip" (drop and count).

    Returns:
      `Loaded` with items ``{"id", "question", "label", "task"}``.
    """
    if task not in _EVAL_MAPPERS:
        raise ValueError(f"eval_items: task must be one of {EVAL_TASKS}, got {task!r}")
    _check_on_error(on_error, "eval_items")
    mapper = _EVAL_MAPPERS[task]
    records, errors = _map_rows(rows, lambda row, i: mapper(row, i, task), source, on_error)
    return _validated("eval", records, errors, source, on_error, task)


def load_benchmark(
    task: str,
    source: str | None = None,
    *,
    subset: str | None = None,
    split: str | None = None,
    backend: str = "datasets",
    on_error: str = "raise",
) -> Loaded:
    """Eval items of one of the paper's benchmarks (ARC-E/C, OpenBookQA, SIQA, GSM8K).

    Args:
      task: one of `EVAL_TASKS`.
      source: None for the dataset's hub (or tfds) name, else a hub name, a local
        .json/.jsonl/.parquet file or a dataset folder in the published schema.
      subset: hub config; defaults to the spec's (e.g. "ARC-Easy") when ``source`` is None.
      split: defaults to the split the paper evaluates on (`DATASETS`).
      backend: "datasets" or "tfds".
      on_error: "raise" or "skip".

    Returns:
      `Loaded` with items ``{"id", "question", "label", "task"}``.
    """
    if task not in _EVAL_MAPPERS:
        raise ValueError(f"load_benchmark: task must be one of {EVAL_TASKS}, got {task!r}")
    _check_on_error(on_error, "load_benchmark")
    name, rows = _read_spec(task, source, subset, split, backend)
    if backend == "tfds" and task in _TFDS_ADAPTERS:
        rows = [_TFDS_ADAPTERS[task](row) if isinstance(row, dict) else row for row in rows]
    return eval_items(task, rows, source=name, on_error=on_error)


def _read_spec(name: str, source: str | None, subset: str | None, split: str | None, backend: str) -> tuple[str, list[dict]]:
    spec = DATASETS[name]
    if backend == "tfds" and source is None:
        if spec.tfds is None:
            raise ValueError(f"{name}: no tensorflow-datasets version is known; use backend='datasets'")
        source = spec.tfds
    if source is None:
        source, subset = spec.hub, subset if subset is not None else spec.subset
    return load_rows(source, subset=subset, split=split or spec.split, backend=backend)


# ------------------------------------------------------------------------------------------
# Open Assistant message trees -> first-turn SFT chats and prompts.

_OASST_ROLES = ("prompter", "assistant")


def _oasst_message(row: dict, index: int) -> dict:
    message_id = _string(row, "message_id")
    parent = row.get("parent_id")
    if parent is not None and not isinstance(parent, str):
        raise _Bad(f"field 'parent_id' must be a string or null, got {type(parent).__name__}")
    role = _field(row, "role")
    if role not in _OASST_ROLES:
        raise _Bad(f"field 'role' is {role!r}, expected one of {_OASST_ROLES}")
    text = _field(row, "text")
    if not isinstance(text, str):
        raise _Bad(f"field 'text' must be a string, got {type(text).__name__}")
    rank = row.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, float))):
        raise _Bad(f"field 'rank' must be a number or null, got {rank!r}")
    for flag in ("deleted", "review_result"):
        if row.get(flag) is not None and not isinstance(row[flag], bool):
            raise _Bad(f"field {flag!r} must be a boolean or null, got {row[flag]!r}")
    return {"id": message_id, "parent": parent, "role": role, "text": text, "lang": row.get("lang"), "rank": rank,
            "kept": not row.get("deleted") and row.get("review_result") is not False, "index": index}


def oasst_items(
    kind: str,
    rows: Iterable[dict],
    *,
    lang: str | None = "en",
    source: str = "rows",
    on_error: str = "raise",
) -> Loaded:
    """First-turn SFT chats or prompts from Open Assistant (oasst1) message-tree rows.

    Args:
      kind: "sft" (root prompt + its best-ranked assistant reply) or "prompts" (root prompts).
      rows: oasst1 rows (message_id, parent_id, role, text, lang, rank, deleted, review_result).
      lang: keep messages in this language only (None keeps all).
      source: name of the file or dataset, used in error messages.
      on_error: "raise" or "skip" (malformed rows; filtered ones are not errors).

    Returns:
      `Loaded` with items ``{"id": root message_id, "messages": [user(, assistant)]}``.
    """
    if kind not in ("sft", "prompts"):
        raise ValueError(f"oasst_items: kind must be 'sft' or 'prompts', got {kind!r}")
    _check_on_error(on_error, "oasst_items")
    seen: set[str] = set()

    def parse(row, index):
        message = _oasst_message(row, index)
        if message["id"] in seen:
            raise _Bad(f"duplicate message_id {message['id']!r}")
        seen.add(message["id"])
        return message

    records, errors = _map_rows(rows, parse, source, on_error)
    messages = [m for _, _, m in records if m["kept"] and (lang is None or m["lang"] == lang)]
    roots = [m for m in messages if m["role"] == "prompter" and m["parent"] is None]
    replies: dict[str, list[dict]] = {}
    for m in messages:
        if m["role"] == "assistant" and m["parent"] is not None:
            replies.setdefault(m["parent"], []).append(m)
    out = []
    for root in roots:
        chat = [{"role": "user", "content": root["text"]}]
        if kind == "sft":
            if root["id"] not in replies:
                continue
            # oasst1 ranks sibling replies 0 (best), 1, ...; unranked ones only if nothing is ranked.
            best = min(replies[root["id"]], key=lambda m: (m["rank"] is None, m["rank"] or 0, m["index"]))
            chat.append({"role": "assistant", "content": best["text"]})
        out.append((f"row {root['index']}", None, {"id": root["id"], "messages": chat}))
    return _validated(kind, out, errors, source, on_error)


def load_oasst(
    kind: str = "sft",
    source: str | None = None,
    *,
    split: str | None = None,
    lang: str | None = "en",
    on_error: str = "raise",
) -> Loaded:
    """`oasst_items` of ``OpenAssistant/oasst1`` (or a local file / folder in its schema).

    Args:
      kind: "sft" or "prompts".
      source: None for the hub dataset, else a hub name, local file or dataset folder.
      split: default "train".
      lang: language filter (None keeps all).
      on_error: "raise" or "skip".

    Returns:
      `Loaded` with items ``{"id", "messages"}`` (see `oasst_items`).
    """
    if kind not in ("sft", "prompts"):
        raise ValueError(f"load_oasst: kind must be 'sft' or 'prompts', got {kind!r}")
    _check_on_error(on_error, "load_oasst")
    name, rows = _read_spec(f"oasst_{kind}", source, None, split, "datasets")
    return oasst_items(kind, rows, lang=lang, source=name, on_error=on_error)


# ------------------------------------------------------------------------------------------
# Prompt pools from eval items, writing records, and the export CLI.


def as_prompts(items: Sequence[dict], suffix: str = "") -> list[dict]:
    """Eval items -> prompt-pool records ``{"id", "messages": [user], "task", "answer"}``.

    The label travels as "answer" (the oracle reward reads it; the policy never sees it).
    """
    return [{"id": x["id"], "messages": [{"role": "user", "content": x["question"] + suffix}],
             "task": x["task"], "answer": x["label"]} for x in items]


def write_records(items: Sequence[dict], path: str | Path) -> Path:
    """Writes records as a JSON list (.json) or JSON lines (.jsonl) that `cream_jax.data.sources` reads."""
    path = Path(path)
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise ValueError(f"{path}: output must end in .json or .jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(list(items), ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cream_jax.data.hf_datasets",
        description="Write one of the paper's datasets as a cream_jax JSON/JSONL file (for Data.* paths).",
    )
    parser.add_argument("name", choices=sorted(DATASETS))
    parser.add_argument("--out", required=True, help="output .json or .jsonl")
    parser.add_argument("--source", default=None, help="hub name, local file or folder (default: the published one)")
    parser.add_argument("--subset", default=None)
    parser.add_argument("--split", default=None)
    parser.add_argument("--backend", default="datasets", choices=BACKENDS)
    parser.add_argument("--lang", default="en", help="oasst only; 'all' keeps every language")
    parser.add_argument("--on_error", default="raise", choices=ON_ERROR)
    parser.add_argument("--as_prompts", action="store_true", help="eval sets only: write a prompt pool (label as 'answer')")
    args = parser.parse_args(argv)
    try:
        kind = DATASETS[args.name].kind
        if kind == "eval":
            loaded = load_benchmark(args.name, args.source, subset=args.subset, split=args.split,
                                    backend=args.backend, on_error=args.on_error)
            items = as_prompts(loaded.items) if args.as_prompts else loaded.items
        else:
            if args.as_prompts or args.backend != "datasets":
                raise ValueError(f"{args.name}: --as_prompts and --backend tfds apply to eval sets only")
            loaded = load_oasst(kind, args.source, split=args.split, lang=None if args.lang == "all" else args.lang,
                                on_error=args.on_error)
            items = loaded.items
        path = write_records(items, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{path}: {len(items)} records ({loaded.n_skipped} rows skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
