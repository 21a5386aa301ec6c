"""Tokenization with the model's chat template, padding/bucketing, and grain loaders.

Conventions (METHODS.md section 0 and 2.7-3):

* SFT examples are right-padded; the loss covers every assistant response plus its end-of-turn
  token, optionally also the assistant header (``include_header=True``, as CREAM's code does).
* Prompts are rendered with ``add_generation_prompt=True`` and LEFT-padded (the sampler appends
  to the right); too-long prompts are left-truncated (the end is kept) and counted.
* A sampled (or given) response is joined to its prompt as ``[pad.. prompt | response ..pad]``;
  row ``b * R + r`` holds response r of prompt b.

Token positions are found from character offsets of the rendered conversation, so any chat
template whose rendering of a conversation prefix is a string prefix of the whole works; a
template that breaks this raises instead of mis-masking. Padding uses the tokenizer's pad id
(else its eos id); padded positions always have mask 0.

Shape letters: B examples (prompts, pairs), R responses per prompt, T time, Tp prompt length,
Tr response length.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

BUCKETS = (32, 64, 96, 128, 256, 512, 1024, 2048, 4096, 8192)
ON_OVERFLOW = ("error", "truncate")


def bucket_length(n: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket >= n, so sequences come in a few static lengths (one compile each)."""
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    raise ValueError(f"bucket_length: length {n} exceeds the largest bucket {max(buckets)}")


def pad_id(tokenizer) -> int:
    """The id written at padded positions: pad, else eos (masked out either way)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    raise ValueError("tokenizer has neither a pad nor an eos token")


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode_many(tokenizer, texts: list[str], offsets: bool = True) -> list[tuple[list[int], list]]:
    """Token ids (and character offsets) of many texts, in one batched call: the Rust tokenizer
    is several times faster on a batch than text by text."""
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
    offs = enc["offset_mapping"] if offsets else [[]] * len(texts)
    return [(list(ids), list(o)) for ids, o in zip(enc["input_ids"], offs)]


def token_lengths(tokenizer, messages_list: Sequence[list[dict]], add_generation_prompt: bool) -> list[int]:
    """Tokens of each rendered chat: what `encode_sft` (``add_generation_prompt=False``) and
    `encode_prompts` (True) compare with their maximum length, so truncations can be counted
    before anything is encoded."""
    texts = [_render(tokenizer, m, add_generation_prompt) for m in messages_list]
    return [len(ids) for ids, _ in _encode_many(tokenizer, texts, offsets=False)]


def _prefix(tokenizer, messages: list[dict], upto: int, generation: bool, full: str, name: str) -> int:
    """Length in characters of the rendered ``messages[:upto]``, checked to prefix ``full``."""
    head = _render(tokenizer, messages[:upto], generation) if upto else ""
    if not full.startswith(head):
        raise ValueError(f"{name}: the chat template's rendering of the first {upto} messages is not a prefix "
                         "of the whole conversation; cannot locate the response tokens")
    return len(head)


def _check(name: str, examples: Sequence, on_overflow: str) -> None:
    if not examples:
        raise ValueError(f"{name}: no examples")
    if on_overflow not in ON_OVERFLOW:
        raise ValueError(f"on_overflow must be one of {ON_OVERFLOW}, got {on_overflow!r}")


def _name(ids: Sequence[Any] | None, i: int) -> str:
    return f"example {ids[i]!r}" if ids is not None else f"example {i}"


def encode_sft(
    tokenizer,
    messages_list: Sequence[list[dict]],
    max_len: int | None = None,
    include_header: bool = False,
    *,
    on_overflow: str = "error",
    ids: Sequence[Any] | None = None,
) -> dict[str, np.ndarray]:
    """Tokenizes chats for SFT with a loss mask on the assistant turns.

    Args:
      tokenizer: a transformers tokenizer with a chat template.
      messages_list: B chats (each assistant turn is scored).
      max_len: T; None -> `bucket_length` of the longest example.
      include_header: also score the assistant header tokens (CREAM 2.7-3).
      on_overflow: "error" (raise naming the example) or "truncate" (cut the end).
      ids: example ids for error messages.

    Returns:
      {"input_ids", "attention_mask", "loss_mask"}: int32 [B, T], right-padded; loss_mask is 1 on
      the assistant content and its end-of-turn token (plus the header if asked).
    """
    _check("encode_sft", messages_list, on_overflow)
    fulls, all_spans = [], []
    for i, messages in enumerate(messages_list):
        full = _render(tokenizer, messages, False)
        spans = []
        for j, m in enumerate(messages):
            if m["role"] == "assistant":
                start = _prefix(tokenizer, messages, j, not include_header, full, "encode_sft")
                end = _prefix(tokenizer, messages, j + 1, False, full, "encode_sft")
                spans.append((start, end))
        if not spans:
            raise ValueError(f"encode_sft: {_name(ids, i)} has no assistant turn")
        fulls.append(full)
        all_spans.append(spans)
    rows, masks = [], []
    for (tokens, offsets), spans in zip(_encode_many(tokenizer, fulls), all_spans):
        rows.append(tokens)
        masks.append([int(any(a <= s < b for a, b in spans)) for s, _ in offsets])
    longest = max(len(r) for r in rows)
    T = bucket_length(longest) if max_len is None else max_len
    out = {k: np.zeros((len(rows), T), np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    out["input_ids"][:] = pad_id(tokenizer)
    for i, (tokens, mask) in enumerate(zip(rows, masks)):
        if len(tokens) > T:
            if on_overflow == "error":
                raise ValueError(f"encode_sft: {_name(ids, i)} has {len(tokens)} tokens > max_len={T}")
            tokens, mask = tokens[:T], mask[:T]
        n = len(tokens)
        out["input_ids"][i, :n] = tokens
        out["attention_mask"][i, :n] = 1
        out["loss_mask"][i, :n] = mask
    return out


def encode_prompts(
    tokenizer,
    messages_list: Sequence[list[dict]],
    max_prompt_len: int | None = None,
    on_overflow: str = "truncate",
    *,
    ids: Sequence[Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Renders prompts with the generation header and left-pads them.

    Args:
      tokenizer: a transformers tokenizer with a chat template.
      messages_list: B chats ending with a user turn.
      max_prompt_len: Tp; None -> `bucket_length` of the longest prompt.
      on_overflow: "truncate" (keep the last Tp tokens, counted) or "error" (raise naming the
        example id and its length).
      ids: example ids for error messages.

    Returns:
      (prompt_ids [B, Tp] int32, prompt_mask [B, Tp] int32, n_truncated).
    """
    _check("encode_prompts", messages_list, on_overflow)
    rows = [t for t, _ in _encode_many(tokenizer, [_render(tokenizer, m, True) for m in messages_list])]
    Tp = bucket_length(max(len(r) for r in rows)) if max_prompt_len is None else max_prompt_len
    prompt_ids = np.full((len(rows), Tp), pad_id(tokenizer), np.int32)
    prompt_mask = np.zeros((len(rows), Tp), np.int32)
    n_truncated = 0
    for i, tokens in enumerate(rows):
        if len(tokens) > Tp:
            if on_overflow == "error":
                raise ValueError(f"encode_prompts: {_name(ids, i)} has {len(tokens)} tokens > max_prompt_len={Tp}")
            tokens = tokens[-Tp:]
            n_truncated += 1
        prompt_ids[i, Tp - len(tokens):] = tokens
        prompt_mask[i, Tp - len(tokens):] = 1
    return prompt_ids, prompt_mask, n_truncated


def join_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask, header_len: int = 0) -> dict:
    """Concatenates left-padded prompts with R right-padded responses each, for scoring.

    Works on numpy or jax arrays (jax if any input is one) and inside jit (``header_len`` static).

    Args:
      prompt_ids, prompt_mask: [B, Tp].
      response_ids, response_mask: [B, R, Tr]; the sampler's mask already includes the EOS /
        end-of-turn token and is 0 after it.
      header_len: also mark the last ``header_len`` prompt tokens (the assistant header) as
        scored, CREAM's convention (2.7-3); 0 scores the response only.

    Returns:
      {"input_ids", "attention_mask", "response_mask"}: [B * R, Tp + Tr], row b * R + r.
    """
    arrays = (prompt_ids, prompt_mask, response_ids, response_mask)
    xp = jnp if any(isinstance(a, jax.Array) for a in arrays) else np
    B, Tp = prompt_ids.shape
    _, R, Tr = response_ids.shape
    if prompt_mask.shape != (B, Tp) or response_ids.shape[0] != B or response_mask.shape != (B, R, Tr):
        raise ValueError(
            f"join_prompt_response: shapes prompt {prompt_ids.shape}/{prompt_mask.shape}, "
            f"response {response_ids.shape}/{response_mask.shape} do not match [B, Tp] and [B, R, Tr]"
        )
    if not 0 <= header_len <= Tp:
        raise ValueError(f"join_prompt_response: header_len={header_len} not in 0..Tp={Tp}")
    p_ids = xp.repeat(xp.asarray(prompt_ids), R, axis=0)  # [B*R, Tp]
    p_mask = xp.repeat(xp.asarray(prompt_mask), R, axis=0)  # [B*R, Tp]
    r_ids = xp.reshape(xp.asarray(response_ids), (B * R, Tr))
    r_mask = xp.reshape(xp.asarray(response_mask), (B * R, Tr))
    head = xp.concatenate([xp.zeros_like(p_mask[:, : Tp - header_len]), p_mask[:, Tp - header_len:]], axis=1)
    return {
        "input_ids": xp.concatenate([p_ids, r_ids], axis=1).astype(xp.int32),
        "attention_mask": xp.concatenate([p_mask, r_mask], axis=1).astype(xp.int32),
        "response_mask": xp.concatenate([head, r_mask], axis=1).astype(xp.int32),
    }


def assistant_header_len(tokenizer) -> int:
    """Tokens the generation prompt adds after the last user turn (4 for Llama-3's template)."""
    messages = [{"role": "user", "content": "x"}]
    (with_header, _), (without, _) = _encode_many(
        tokenizer, [_render(tokenizer, messages, True), _render(tokenizer, messages, False)]
    )
    if with_header[: len(without)] != without:
        raise ValueError("assistant_header_len: the generation prompt does not extend the rendered prompt")
    return len(with_header) - len(without)


def encode_responses(
    tokenizer,
    prompts: Sequence[list[dict]],
    responses: Sequence[Sequence[str]],
    max_response_len: int | None = None,
    *,
    on_overflow: str = "error",
    ids: Sequence[Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes R response texts per prompt as the assistant turn (content + end-of-turn).

    The tokens are those of the rendered conversation after the rendered prompt with the
    generation header, i.e. what the model would have sampled.

    Args:
      tokenizer: a transformers tokenizer with a chat template.
      prompts: B chats ending with a user turn.
      responses: B lists of R texts.
      max_response_len: Tr; None -> `bucket_length` of the longest.
      on_overflow: "error" or "truncate" (cut the end).
      ids: example ids for error messages.

    Returns:
      (response_ids [B, R, Tr] int32, response_mask [B, R, Tr] int32), right-padded.
    """
    _check("encode_responses", prompts, on_overflow)
    widths = {len(r) for r in responses}
    if len(prompts) != len(responses) or len(widths) != 1:
        raise ValueError(f"encode_responses: {len(prompts)} prompts, response counts {sorted(widths)} (need one R)")
    R = widths.pop()
    head_texts = [_render(tokenizer, prompt, True) for prompt in prompts]
    heads = [t for t, _ in _encode_many(tokenizer, head_texts)]
    fulls = []
    for prompt, head_text, texts in zip(prompts, head_texts, responses):
        for text in texts:
            full = _render(tokenizer, list(prompt) + [{"role": "assistant", "content": text}], False)
            if not full.startswith(head_text):
                raise ValueError("encode_responses: the rendered prompt is not a prefix of the rendered conversation")
            fulls.append(full)
    rows = []
    for k, (tokens, offsets) in enumerate(_encode_many(tokenizer, fulls)):
        head_text, head = head_texts[k // R], heads[k // R]
        n_head = sum(s < len(head_text) for s, _ in offsets)
        if tokens[:n_head] != head:
            raise ValueError(f"encode_responses: {_name(ids, k // R)}: the tokenizer merges across the "
                             "prompt/response boundary; prompt tokens differ from the sampled prompt")
        rows.append(tokens[n_head:])
    Tr = bucket_length(max(len(r) for r in rows)) if max_response_len is None else max_response_len
    response_ids = np.full((len(rows), Tr), pad_id(tokenizer), np.int32)
    response_mask = np.zeros((len(rows), Tr), np.int32)
    for k, tokens in enumerate(rows):
        if len(tokens) > Tr:
            if on_overflow == "error":
                raise ValueError(f"encode_responses: {_name(ids, k // R)} response {k % R} has {len(tokens)} "
                                 f"tokens > max_response_len={Tr}")
            tokens = tokens[:Tr]
        response_ids[k, : len(tokens)] = tokens
        response_mask[k, : len(tokens)] = 1
    return response_ids.reshape(len(prompts), R, Tr), response_mask.reshape(len(prompts), R, Tr)


def encode_pairs(
    tokenizer,
    prompts: Sequence[list[dict]],
    chosen: Sequence[str],
    rejected: Sequence[str],
    max_prompt_len: int | None = None,
    max_response_len: int | None = None,
    include_header: bool = False,
    *,
    on_overflow: str = "error",
    ids: Sequence[Any] | None = None,
) -> dict[str, np.ndarray]:
    """Text preference pairs in the `join_prompt_response` layout with R = 2.

    Args:
      tokenizer: a transformers tokenizer with a chat template.
      prompts: B chats ending with a user turn.
      chosen, rejected: B response texts each.
      max_prompt_len, max_response_len: Tp, Tr; None -> buckets of the longest.
      include_header: also score the assistant header tokens (CREAM 2.7-3).
      on_overflow: "error" or "truncate" (prompts keep their end, responses their start).
      ids: example ids for error messages.

    Returns:
      {"input_ids", "attention_mask", "response_mask"}: int32 [2B, Tp + Tr]; row 2b is the chosen
      and row 2b + 1 the rejected response of pair b.
    """
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(f"encode_pairs: {len(prompts)} prompts, {len(chosen)} chosen, {len(rejected)} rejected")
    prompt_ids, prompt_mask, _ = encode_prompts(tokenizer, prompts, max_prompt_len, on_overflow, ids=ids)
    response_ids, response_mask = encode_responses(
        tokenizer, prompts, [[c, r] for c, r in zip(chosen, rejected)], max_response_len, on_overflow=on_overflow, ids=ids
    )
    header = assistant_header_len(tokenizer) if include_header else 0
    return join_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask, header)


def encode_corpus(tokenizer, items: Sequence[Mapping], seq_len: int) -> dict[str, np.ndarray]:
    """Packs a pretraining corpus into rows of ``seq_len`` tokens.

    A {"text"} item becomes bos + text + eos; a {"messages"} item its rendered chat (the template
    writes bos and every end-of-turn). Documents are concatenated and cut into rows; the last row
    is right-padded.

    Args:
      tokenizer: a transformers tokenizer with a chat template.
      items: corpus items, e.g. `Suite.pretrain`.
      seq_len: T.

    Returns:
      {"input_ids", "attention_mask", "loss_mask"}: int32 [N, T] (loss on every real token).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("encode_corpus: tokenizer has no eos token to end plain-text documents")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    texts = []
    for i, item in enumerate(items):
        if "messages" in item:
            texts.append(_render(tokenizer, item["messages"], False))
        elif "text" in item:
            texts.append(item["text"])
        else:
            raise ValueError(f"encode_corpus: item {i} has neither 'text' nor 'messages'")
    stream: list[int] = []
    for item, (tokens, _) in zip(items, _encode_many(tokenizer, texts, offsets=False)):
        stream += tokens if "messages" in item else bos + tokens + eos
    n_rows = -(-len(stream) // seq_len)
    ids = np.full(n_rows * seq_len, pad_id(tokenizer), np.int32)
    mask = np.zeros(n_rows * seq_len, np.int32)
    ids[: len(stream)] = stream
    mask[: len(stream)] = 1
    ids, mask = ids.reshape(n_rows, seq_len), mask.reshape(n_rows, seq_len)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.copy()}


class _Rows:
    """Random-access rows of a dict of equal-length arrays (a grain source)."""

    def __init__(self, arrays: Mapping[str, Any]):
        self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
        sizes = {len(v) for v in self._arrays.values()}
        if len(sizes) != 1:
            raise ValueError(f"make_loader: arrays have different leading sizes {sorted(sizes)}")
        self._n = sizes.pop()

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self._arrays.items()}


def make_loader(
    records: Sequence | Mapping[str, Any],
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    drop_remainder: bool = True,
    transform: Callable[[Any], Any] | None = None,
    num_threads: int = 0,
) -> grain.DatasetIterator:
    """A resumable batch iterator: grain MapDataset source -> shuffle(seed) -> repeat -> map -> batch.

    Args:
      records: a sequence of records, or a dict of equal-length arrays (rows are records).
      batch_size: records per batch.
      seed: shuffle seed (each epoch is shuffled differently, deterministically).
      shuffle: shuffle the records.
      num_epochs: passes over the data; None repeats forever.
      drop_remainder: drop a last incomplete batch (keeps shapes static).
      transform: applied to each record before batching (must return a pytree of arrays).
      num_threads: grain read threads (0: read in the calling thread, deterministic and frugal).

    Returns:
      A grain ``DatasetIterator`` of batches (leaves stacked on a new leading axis);
      ``it.get_state()`` / ``it.set_state(state)`` save and restore the position, so a resumed
      run continues at the same batch.
    """
    if batch_size < 1:
        raise ValueError(f"make_loader: batch_size must be >= 1, got {batch_size}")
    source = _Rows(records) if isinstance(records, Mapping) else records
    if len(source) == 0:
        raise ValueError("make_loader: no records")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if transform is not None:
        ds = ds.map(transform)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(1, 2 * num_threads))
    return iter(ds.to_iter_dataset(read))
