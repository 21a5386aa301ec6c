"""Host-array loops over the jitted programs: batches split over the model's mesh (the one
batching path, `cream_jax.engine.batching`; a short batch padded only to its mesh bucket), N samples per prompt, summed response log-probs, decoding, and the tokens the loop needs.

Every stage of the loop (rollout, log-prob tables, judge read-outs, evaluation) goes through these,
so each compiles once per shape and a notebook can call them on plain arrays.

Shape letters: B prompts, R responses per prompt, T time (prompt + response), S response length.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from cream_jax.engine import batching

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


def mesh_of(model: Any) -> jax.sharding.Mesh:
    """The mesh ``model``'s parameters live on (a one-device mesh for an unsharded model), which
    every phase's batch is split over (`cream_jax.engine.batching`)."""
    leaf = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
    if isinstance(leaf.sharding, jax.sharding.NamedSharding):
        return leaf.sharding.mesh
    device = next(iter(leaf.sharding.device_set))
    return jax.sharding.Mesh(np.asarray([device]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


def batched(model: Any, fn: Callable[..., Any], arrays: Sequence[np.ndarray], batch_size: int, progress=None) -> Any:
    """``fn(*global_arrays)`` over chunks of at most ``batch_size`` rows, each split over the rows of
    ``model``'s mesh and padded only to its mesh bucket (`batching.map_batched`); host outputs,
    concatenated, without padding rows."""
    return batching.map_batched(fn, arrays, mesh_of(model), batch_size, progress=progress)


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
    layers: str = "unroll",
) -> tuple[np.ndarray, np.ndarray]:
    """N responses per prompt: ``(tokens [B, R, S], mask [B, R, S])`` on the host (``layers``:
    `cream_jax.sampling.generate`'s decode layers)."""
    counter = iter(range(1 << 30))

    def one(ids, mask):
        return generate(
            model, ids, mask, key=jax.random.fold_in(key, next(counter)), num_samples=num_samples,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            eos_id=tokens.eos_ids, pad_id=tokens.pad_id, layers=layers,
        )

    return batched(model, one, [prompt_ids, prompt_mask], batch_size, progress)


def score_sequences(model: Any, seqs: dict, batch_size: int, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs and token counts of every joined (prompt, response) row."""

    def one(ids, mask, resp):
        return sequence_logprobs(model, ids, mask, resp)

    arrays = [seqs["input_ids"], seqs["attention_mask"], seqs["response_mask"]]
    return batched(model, one, arrays, batch_size, progress)


def decode_responses(tokenizer: Any, tokens: np.ndarray, mask: np.ndarray) -> list[list[str]]:
    """Texts of ``tokens [B, R, S]`` (special tokens such as end-of-turn dropped)."""
    b, r, _ = tokens.shape
    return [
        [tokenizer.decode(tokens[i, j][mask[i, j] > 0].tolist(), skip_special_tokens=True) for j in range(r)]
        for i in range(b)
    ]
