"""Hugging Face LLaMA checkpoints (config.json + safetensors) <-> :class:`~cream_jax.models.llama.Llama`.

Shape letters: L layers, N query heads, K key/value heads, H head dim, D embed, F mlp, V vocab.

HF stores ``nn.Linear`` weights as [out, in]; the NNX model keeps [in, out] with heads split out
(``wq [D,N,H]``, ``wo [N,H,D]``) and every layer stacked on a leading L axis. Only safetensors are
read (with safetensors' numpy API, bf16 through ml_dtypes); pickle checkpoints are refused.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from cream_jax import sharding
from cream_jax.models.llama import Llama, LlamaConfig

_INDEX = "model.safetensors.index.json"
_PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.pkl", "*.bin")
_DEFAULT_SHARD_BYTES = 2 * 1024**3


class _Tensor(NamedTuple):
    """One NNX parameter and the HF tensor(s) it comes from (``{i}`` = layer index)."""

    path: tuple[str, ...]  # NNX state path
    hf_name: str
    hf_shape: Callable[[LlamaConfig], tuple[int, ...]]
    to_nnx: Callable[[np.ndarray, LlamaConfig], np.ndarray]  # one HF tensor -> one (layer's) NNX value
    to_hf: Callable[[np.ndarray, LlamaConfig], np.ndarray]


def _same(a, c):
    return a


def _t(a, c):
    return a.T


def _linear_in_heads(heads: str) -> tuple[Callable, Callable, Callable]:
    """HF [heads*H, D] <-> NNX [D, heads, H] for q/k/v projections."""
    n = lambda c: getattr(c, heads)  # noqa: E731
    return (
        lambda c: (n(c) * c.head_dim, c.hidden_size),
        lambda a, c: a.T.reshape(c.hidden_size, n(c), c.head_dim),
        lambda a, c: a.reshape(c.hidden_size, n(c) * c.head_dim).T,
    )


def _bias_heads(heads: str) -> tuple[Callable, Callable, Callable]:
    """HF [heads*H] <-> NNX [heads, H]."""
    n = lambda c: getattr(c, heads)  # noqa: E731
    return (
        lambda c: (n(c) * c.head_dim,),
        lambda a, c: a.reshape(n(c), c.head_dim),
        lambda a, c: a.reshape(n(c) * c.head_dim),
    )


def _tensor_table(config: LlamaConfig) -> list[_Tensor]:
    """Every NNX parameter of ``config``'s model with its HF name and layout conversions."""
    D, F = lambda c: (c.hidden_size,), lambda c: (c.intermediate_size,)
    NH = lambda c: c.num_attention_heads * c.head_dim  # noqa: E731
    lay = "model.layers.{i}."
    table = [
        _Tensor(("embed",), "model.embed_tokens.weight", lambda c: (c.vocab_size, c.hidden_size), _same, _same),
        _Tensor(("layers", "input_norm"), lay + "input_layernorm.weight", D, _same, _same),
        _Tensor(("layers", "attn", "wq"), lay + "self_attn.q_proj.weight", *_linear_in_heads("num_attention_heads")),
        _Tensor(("layers", "attn", "wk"), lay + "self_attn.k_proj.weight", *_linear_in_heads("num_key_value_heads")),
        _Tensor(("layers", "attn", "wv"), lay + "self_attn.v_proj.weight", *_linear_in_heads("num_key_value_heads")),
        _Tensor(("layers", "attn", "wo"), lay + "self_attn.o_proj.weight", lambda c: (c.hidden_size, NH(c)),
                lambda a, c: a.T.reshape(c.num_attention_heads, c.head_dim, c.hidden_size),
                lambda a, c: a.reshape(NH(c), c.hidden_size).T),
        _Tensor(("layers", "post_attn_norm"), lay + "post_attention_layernorm.weight", D, _same, _same),
        _Tensor(("layers", "mlp", "w_gate"), lay + "mlp.gate_proj.weight", lambda c: (c.intermediate_size, c.hidden_size), _t, _t),
        _Tensor(("layers", "mlp", "w_up"), lay + "mlp.up_proj.weight", lambda c: (c.intermediate_size, c.hidden_size), _t, _t),
        _Tensor(("layers", "mlp", "w_down"), lay + "mlp.down_proj.weight", lambda c: (c.hidden_size, c.intermediate_size), _t, _t),
        _Tensor(("final_norm",), "model.norm.weight", D, _same, _same),
    ]
    if config.attention_bias:
        table += [
            _Tensor(("layers", "attn", "bq"), lay + "self_attn.q_proj.bias", *_bias_heads("num_attention_heads")),
            _Tensor(("layers", "attn", "bk"), lay + "self_attn.k_proj.bias", *_bias_heads("num_key_value_heads")),
            _Tensor(("layers", "attn", "bv"), lay + "self_attn.v_proj.bias", *_bias_heads("num_key_value_heads")),
            _Tensor(("layers", "attn", "bo"), lay + "self_attn.o_proj.bias", D, _same, _same),
        ]
    if config.mlp_bias:
        table += [
            _Tensor(("layers", "mlp", "b_gate"), lay + "mlp.gate_proj.bias", F, _same, _same),
            _Tensor(("layers", "mlp", "b_up"), lay + "mlp.up_proj.bias", F, _same, _same),
            _Tensor(("layers", "mlp", "b_down"), lay + "mlp.down_proj.bias", D, _same, _same),
        ]
    if not config.tie_word_embeddings:
        table.append(_Tensor(("lm_head",), "lm_head.weight", lambda c: (c.vocab_size, c.hidden_size), _t, _t))
    return table


def _hf_names(t: _Tensor, config: LlamaConfig) -> list[str]:
    if t.path[0] == "layers":
        return [t.hf_name.format(i=i) for i in range(config.num_hidden_layers)]
    return [t.hf_name]


def _read_config(path: str, dtype_name: str, caller: str) -> LlamaConfig:
    if not os.path.isdir(path):
        raise ValueError(f"{caller}: {path}: no such folder")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"{caller}: {path}: missing config.json")
    with open(cfg_file) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{caller}: {cfg_file}: invalid JSON ({e})") from None
    try:
        return LlamaConfig.from_hf(raw, dtype=dtype_name)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{caller}: {cfg_file}: {e}") from None


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, _INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted({os.path.join(path, v) for v in weight_map.values()})
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"load_hf_llama: {path}: {_INDEX} lists missing files {[os.path.basename(m) for m in missing]}")
        return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        return files
    if any(glob.glob(os.path.join(path, p)) for p in _PICKLE_PATTERNS):
        raise ValueError(f"load_hf_llama: {path}: pickle checkpoints are not loaded; convert to safetensors")
    raise ValueError(f"load_hf_llama: {path}: no *.safetensors weights found")


def _dtype_name(dtype: Any) -> str:
    name = jnp.dtype(dtype).name
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"load_hf_llama: dtype must be float32 or bfloat16, got {name}")
    return name


def load_hf_llama(path: str, dtype: Any = jnp.float32, mesh: jax.sharding.Mesh | None = None, *,
                  remat: bool = False) -> tuple[Llama, LlamaConfig]:
    """Loads a local HF LLaMA checkpoint folder into a :class:`Llama`.

    The model is built abstractly (no random init); each parameter is assembled on the host from
    its per-layer tensors, converted to ``dtype`` and placed at once (sharded by its logical names
    when ``mesh`` is given), so at most one stacked parameter is held on the host at a time.

    Args:
      path: folder with config.json and model.safetensors, or shards + model.safetensors.index.json.
      dtype: parameter/activation dtype, jnp.float32 or jnp.bfloat16.
      mesh: optional ("data", "fsdp", "tensor") mesh to shard the parameters on.
      remat: rematerialise layer activations in the backward pass (see :class:`Llama`).

    Returns:
      (model, config).
    """
    config = _read_config(path, _dtype_name(dtype), "load_hf_llama")
    files = _safetensors_files(path)
    table = _tensor_table(config)
    with contextlib.ExitStack() as stack:
        where = {}
        for file in files:
            handle = stack.enter_context(safe_open(file, framework="np"))
            where.update({k: handle for k in handle.keys()})
        wanted = [n for t in table for n in _hf_names(t, config)]
        missing = [n for n in wanted if n not in where]
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ValueError(f"load_hf_llama: {path}: missing tensors {missing[:5]}{more}")

        abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), remat=remat))
        graphdef, abs_state = nnx.split(abstract)
        shardings = sharding.param_shardings(abs_state, mesh) if mesh is not None else None
        values: dict = {}
        for t in table:
            names = _hf_names(t, config)
            host = np.empty(_get(abs_state, t.path).shape, config.jnp_dtype)
            for i, name in enumerate(names):
                handle = where[name]
                got = tuple(handle.get_slice(name).get_shape())
                expected = t.hf_shape(config)
                if got != expected:
                    raise ValueError(f"load_hf_llama: {path}: tensor {name} has shape {got}, expected {expected}")
                value = t.to_nnx(handle.get_tensor(name), config)
                if t.path[0] == "layers":
                    host[i] = value
                else:
                    host[...] = value
            target = _get(shardings, t.path) if shardings is not None else None
            _set(values, t.path, jax.device_put(host, target) if target is not None else jnp.asarray(host))
            del host
    nnx.replace_by_pure_dict(abs_state, values)
    return nnx.merge(graphdef, abs_state), config


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def save_hf_llama(model: Llama, config: LlamaConfig, path: str, *, max_shard_bytes: int = _DEFAULT_SHARD_BYTES,
                  tokenizer: Any = None) -> None:
    """Writes ``model`` as an HF checkpoint that ``transformers.LlamaForCausalLM.from_pretrained`` loads.

    Writes config.json and model.safetensors, or numbered shards of at most ``max_shard_bytes``
    plus model.safetensors.index.json. Tensors keep the model's dtype. Parameters are fetched
    one layer slice at a time, so the host holds at most one shard. With ``tokenizer``, its files
    and chat template are written beside the weights, so the folder is a complete model source
    (`load_tokenizer` and ``AutoTokenizer`` load it).

    Args:
      model: the model to save (its parameters may be sharded on a mesh).
      config: its config (written as config.json).
      path: output folder (created if needed).
      max_shard_bytes: the largest safetensors file to write before splitting.
      tokenizer: optional ``transformers`` tokenizer of the model (``save_pretrained`` is called).
    """
    os.makedirs(path, exist_ok=True)
    state = nnx.state(model, nnx.Param)
    entries = []  # (hf name, table entry, layer index or None, nbytes)
    for t in _tensor_table(config):
        value = _get(state, t.path)
        per = int(np.prod(t.hf_shape(config))) * jnp.dtype(value.dtype).itemsize
        layers = range(config.num_hidden_layers) if t.path[0] == "layers" else [None]
        entries += [(t.hf_name.format(i=i), t, i, per) for i in layers]
    shards, size = [[]], 0
    for e in entries:
        if shards[-1] and size + e[3] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e[3]
    files = (["model.safetensors"] if len(shards) == 1
             else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    weight_map = {}
    for file, shard in zip(files, shards):
        tensors = {}
        for name, t, i, _ in shard:
            value = _get(state, t.path)[...]
            value = value if i is None else value[i]
            tensors[name] = np.ascontiguousarray(t.to_hf(np.asarray(jax.device_get(value)), config))
            weight_map[name] = file
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
    if len(shards) > 1:
        with open(os.path.join(path, _INDEX), "w") as f:
            json.dump({"metadata": {"total_size": sum(e[3] for e in entries)}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config.to_hf(), f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str) -> Any:
    """``transformers.AutoTokenizer`` from a local folder (chat template kept, no remote code).

    A ``.gguf`` file (or ``pkg:`` source naming one) gives the tokenizer of its metadata
    (`cream_jax.models.gguf.load_gguf_tokenizer`).
    """
    path = os.fspath(path)  # the embedded tokenizer folder is a pathlib.Path
    if path.endswith(".gguf") or path.startswith("pkg:"):
        from cream_jax.models import gguf

        return gguf.load_gguf_tokenizer(gguf.resolve_model_source(path))
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise ValueError(f"load_tokenizer: {path}: no such folder")
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        # Without this check transformers asks to "install sentencepiece or tiktoken".
        raise ValueError(f"load_tokenizer: {path}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
                         f"save_hf_llama(..., tokenizer=tok) writes them")
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
