"""Tiny random HF LLaMA checkpoints and a tiny character-level HF tokenizer, built locally for tests.

Nothing is downloaded. Typical use (other test files may import these):

    from tests._tiny_models import save_tiny_llama, save_tiny_tokenizer, TINY_LLAMA
    hf_model = save_tiny_llama(tmp_path / "m", num_key_value_heads=2)   # writes the folder
    tok = save_tiny_tokenizer(tmp_path / "m")                            # same folder is fine

The tokenizer maps each printable ASCII character (plus "\\n") to one id and has the special
tokens ``<pad>`` (0), ``<s>`` (1), ``</s>`` (2), ``<unk>`` (3), ``<|system|>``, ``<|user|>``,
``<|assistant|>``, with a chat template ``<s><|user|>...</s><|assistant|>...</s>``; its vocabulary
(102 ids) fits ``TINY_LLAMA["vocab_size"] = 128``.
"""

from __future__ import annotations

import os
import string
from typing import Any

import numpy as np

# Small enough for sub-second forwards on CPU, with GQA (4 query heads over 2 KV heads).
TINY_LLAMA: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_hf_config(**overrides: Any):
    """A ``transformers.LlamaConfig`` from TINY_LLAMA with ``overrides`` (e.g. rope_scaling={...})."""
    import transformers

    kwargs = {**TINY_LLAMA, **overrides}
    return transformers.LlamaConfig(**kwargs)


def tiny_hf_model(seed: int = 0, **overrides: Any):
    """A random ``LlamaForCausalLM`` (eager attention, float32, eval mode).

    Every parameter, norms and biases included, is drawn at random (HF would init norms to 1
    and biases to 0, which would hide a wrong mapping of those tensors).
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(tiny_hf_config(**overrides))
    model.config._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def save_tiny_llama(path: str | os.PathLike, seed: int = 0, dtype: str = "float32",
                    max_shard_size: str | None = None, **overrides: Any):
    """Writes a random tiny LLaMA checkpoint (config.json + safetensors) and returns the HF model.

    Args:
      path: output folder.
      seed: torch seed of the random weights.
      dtype: "float32" or "bfloat16" weights on disk (the returned model has that dtype too).
      max_shard_size: e.g. "20KB" to force a sharded checkpoint with model.safetensors.index.json.
      **overrides: LlamaConfig fields to change from TINY_LLAMA.
    """
    import torch

    model = tiny_hf_model(seed, **overrides)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), safe_serialization=True, **kwargs)
    return model


def save_tiny_tokenizer(path: str | os.PathLike):
    """Writes a character-level ``PreTrainedTokenizerFast`` (with chat template) and returns it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.printable[:95]) + ["\n"]  # digits, letters, punctuation, space, newline
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )
    tok.save_pretrained(str(path))
    return tok


def random_batch(batch: int, length: int, vocab: int, seed: int = 0, left_pad: bool = True,
                 min_len: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids [B,T] int32 and a padding mask [B,T] int32 (left- or right-padded rows).

    Row 0 is always full length; pad positions hold token 0.
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, length)).astype(np.int32)
    lens = rng.integers(min_len, length + 1, size=batch)
    lens[0] = length
    pos = np.arange(length)[None, :]
    mask = (pos >= length - lens[:, None]) if left_pad else (pos < lens[:, None])
    mask = mask.astype(np.int32)
    return np.where(mask > 0, ids, 0).astype(np.int32), mask


def random_llama(config, seed: int = 0, std: float = 0.2):
    """A cream_jax ``Llama`` for ``config`` with numpy-random parameters (norms near 1).

    Built abstractly and filled from numpy, so it costs no XLA compilation (a random init via
    ``Llama(config, rngs=...)`` compiles one threefry kernel per parameter shape).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cream_jax.models.llama import Llama

    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    pure = nnx.to_pure_dict(state)

    def fill(path, x):
        base = 1.0 if "norm" in str(path[-1]) else 0.0
        return jnp.asarray((base + std * rng.standard_normal(x.shape)).astype(np.float32), dtype=x.dtype)

    pure = jax.tree_util.tree_map_with_path(fill, pure)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
