"""Hugging Face LLaMA checkpoints (config.json + safetensors) <-> :class:`~cream_jax.models.llama.Llama`.

Shape letters: L layers, N query heads, K key/value heads, H head dim, D embed, F mlp, V vocab.

HF stores ``nn.Linear`` weights as [out, in]; the NNX model keeps [in, out] with heads split out
(``wq [D,N,H]``, ``wo [N,H,D]``) and every layer stacked on a leading L axis. Only safetensors are
read (with safetensors' numpy API, bf16 through ml_dtypes); pickle checkpoints are refused.

Multi-host: loading reads on each process only the slices of each tensor that its own devices hold
(``safe_open(...).get_slice`` inside ``jax.make_array_from_callback``); saving gathers one tensor
(one layer's slice) at a time and process 0 alone writes the files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
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
    # (HF tensor slicer, one layer's NNX index as ranges, config) -> that block of the NNX value.
    read: Callable[[Any, tuple[range, ...], LlamaConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, LlamaConfig], np.ndarray]


def _sl(r: range) -> slice:
    return slice(r.start, r.stop)


def _same(a, c):
    return a


def _t(a, c):
    return a.T


def _read_same(hf, idx, c):
    return hf[tuple(_sl(r) for r in idx)]


def _read_t(hf, idx, c):
    """NNX [in, out] block from HF [out, in]."""
    return hf[_sl(idx[1]), _sl(idx[0])].T


def _head_rows(heads: range, c: LlamaConfig) -> slice:
    """HF rows (or columns) of whole heads ``heads`` (a head's H values are contiguous)."""
    return slice(heads.start * c.head_dim, heads.stop * c.head_dim)


def _linear_in_heads(heads: str) -> tuple[Callable, Callable, Callable]:
    """HF [heads*H, D] <-> NNX [D, heads, H] for q/k/v projections."""
    n = lambda c: getattr(c, heads)  # noqa: E731

    def read(hf, idx, c):
        d, hs, h = idx
        block = hf[_head_rows(hs, c), _sl(d)]  # [len(hs)*H, len(d)]
        return block.T.reshape(len(d), len(hs), c.head_dim)[:, :, _sl(h)]

    return (
        lambda c: (n(c) * c.head_dim, c.hidden_size),
        read,
        lambda a, c: a.reshape(c.hidden_size, n(c) * c.head_dim).T,
    )


def _read_wo(hf, idx, c):
    """NNX wo [N, H, D] block from HF o_proj [D, N*H]."""
    hs, h, d = idx
    block = hf[_sl(d), _head_rows(hs, c)]  # [len(d), len(hs)*H]
    return block.T.reshape(len(hs), c.head_dim, len(d))[:, _sl(h), :]


def _bias_heads(heads: str) -> tuple[Callable, Callable, Callable]:
    """HF [heads*H] <-> NNX [heads, H]."""
    n = lambda c: getattr(c, heads)  # noqa: E731

    def read(hf, idx, c):
        hs, h = idx
        return hf[_head_rows(hs, c)].reshape(len(hs), c.head_dim)[:, _sl(h)]

    return (
        lambda c: (n(c) * c.head_dim,),
        read,
        lambda a, c: a.reshape(n(c) * c.head_dim),
    )


def _tensor_table(config: LlamaConfig) -> list[_Tensor]:
    """Every NNX parameter of ``config``'s model with its HF name and layout conversions."""
    D, F = lambda c: (c.hidden_size,), lambda c: (c.intermediate_size,)
    NH = lambda c: c.num_attention_heads * c.head_dim  # noqa: E731
    lay = "model.layers.{i}."
    table = [
        _Tensor(("embed",), "model.embed_tokens.weight", lambda c: (c.vocab_size, c.hidden_size), _read_same, _same),
        _Tensor(("layers", "input_norm"), lay + "input_layernorm.weight", D, _read_same, _same),
        _Tensor(("layers", "attn", "wq"), lay + "self_attn.q_proj.weight", *_linear_in_heads("num_attention_heads")),
        _Tensor(("layers", "attn", "wk"), lay + "self_attn.k_proj.weight", *_linear_in_heads("num_key_value_heads")),
        _Tensor(("layers", "attn", "wv"), lay + "self_attn.v_proj.weight", *_linear_in_heads("num_key_value_heads")),
        _Tensor(("layers", "attn", "wo"), lay + "self_attn.o_proj.weight", lambda c: (c.hidden_size, NH(c)),
                _read_wo, lambda a, c: a.reshape(NH(c), c.hidden_size).T),
        _Tensor(("layers", "post_attn_norm"), lay + "post_attention_layernorm.weight", D, _read_same, _same),
        _Tensor(("layers", "mlp", "w_gate"), lay + "mlp.gate_proj.weight", lambda c: (c.intermediate_size, c.hidden_size), _read_t, _t),
        _Tensor(("layers", "mlp", "w_up"), lay + "mlp.up_proj.weight", lambda c: (c.intermediate_size, c.hidden_size), _read_t, _t),
        _Tensor(("layers", "mlp", "w_down"), lay + "mlp.down_proj.weight", lambda c: (c.hidden_size, c.intermediate_size), _read_t, _t),
        _Tensor(("final_norm",), "model.norm.weight", D, _read_same, _same),
    ]
    if config.attention_bias:
        table += [
            _Tensor(("layers", "attn", "bq"), lay + "self_attn.q_proj.bias", *_bias_heads("num_attention_heads")),
            _Tensor(("layers", "attn", "bk"), lay + "self_attn.k_proj.bias", *_bias_heads("num_key_value_heads")),
            _Tensor(("layers", "attn", "bv"), lay + "self_attn.v_proj.bias", *_bias_heads("num_key_value_heads")),
            _Tensor(("layers", "attn", "bo"), lay + "self_attn.o_proj.bias", D, _read_same, _same),
        ]
    if config.mlp_bias:
        table += [
            _Tensor(("layers", "mlp", "b_gate"), lay + "mlp.gate_proj.bias", F, _read_same, _same),
            _Tensor(("layers", "mlp", "b_up"), lay + "mlp.up_proj.bias", F, _read_same, _same),
            _Tensor(("layers", "mlp", "b_down"), lay + "mlp.down_proj.bias", D, _read_same, _same),
        ]
    if not config.tie_word_embeddings:
        table.append(_Tensor(("lm_head",), "lm_head.weight", lambda c: (c.vocab_size, c.hidden_size), _read_t, _t))
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


def _dtype_name(dtype: Any, caller: str = "load_hf_llama") -> str:
    name = jnp.dtype(dtype).name
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"{caller}: dtype must be float32 or bfloat16, got {name}")
    return name


def load_hf_llama(path: str, dtype: Any = jnp.float32, mesh: jax.sharding.Mesh | None = None, *,
                  param_dtype: Any = None, remat: bool | str = False) -> tuple[Llama, LlamaConfig]:
    """Loads a local HF LLaMA checkpoint folder into a :class:`Llama`.

    The model is built abstractly (no random init). Each parameter is assembled with
    ``jax.make_array_from_callback``: every device's block is read straight from the safetensors
    slices it covers (``get_slice``), converted and cast, so a process reads only what its own
    devices hold and no host ever holds a whole stacked parameter (multi-host sound).

    Args:
      path: folder with config.json and model.safetensors, or shards + model.safetensors.index.json.
      dtype: compute dtype (activations), jnp.float32 or jnp.bfloat16.
      mesh: optional ("data", "fsdp", "tensor") mesh to shard the parameters on (else this
        process's first local device).
      param_dtype: dtype the parameters are stored in (float32 master weights with a bfloat16
        ``dtype``, as MaxText); None: ``dtype``.
      remat: layer rematerialisation in the backward pass (see :class:`Llama`).

    Returns:
      (model, config).
    """
    config = _read_config(path, _dtype_name(dtype), "load_hf_llama")
    if param_dtype is not None:
        config = dataclasses.replace(config, param_dtype=_dtype_name(param_dtype))
    files = _safetensors_files(path)
    table = _tensor_table(config)
    store = config.jnp_param_dtype
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
        for t in table:
            expected = t.hf_shape(config)
            for name in _hf_names(t, config):
                got = tuple(where[name].get_slice(name).get_shape())
                if got != expected:
                    raise ValueError(f"load_hf_llama: {path}: tensor {name} has shape {got}, expected {expected}")

        abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), remat=remat))
        graphdef, abs_state = nnx.split(abstract)
        if mesh is not None:
            shardings = sharding.param_shardings(abs_state, mesh)
        else:
            local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree.map(lambda _: local, abs_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        values: dict = {}
        for t in table:
            shape = _get(abs_state, t.path).shape
            names = _hf_names(t, config)
            stacked = t.path[0] == "layers"
            blocks: dict = {}  # replicas of one block are read once

            def block(index, t=t, shape=shape, names=names, stacked=stacked, blocks=blocks):
                ranges = tuple(range(*s.indices(n)) for s, n in zip(index, shape))
                key = tuple((r.start, r.stop) for r in ranges)
                if key not in blocks:
                    if stacked:
                        value = np.stack([t.read(where[names[i]].get_slice(names[i]), ranges[1:], config)
                                          for i in ranges[0]])
                    else:
                        value = t.read(where[names[0]].get_slice(names[0]), ranges, config)
                    blocks[key] = np.ascontiguousarray(value.astype(store))
                return blocks[key]

            _set(values, t.path, jax.make_array_from_callback(shape, _get(shardings, t.path), block))
            blocks.clear()
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
                  dtype: Any = None, tokenizer: Any = None) -> None:
    """Writes ``model`` as an HF checkpoint that ``transformers.LlamaForCausalLM.from_pretrained`` loads.

    Writes config.json and model.safetensors, or numbered shards of at most ``max_shard_bytes``
    plus model.safetensors.index.json. Tensors keep the parameters' (master weights') dtype
    unless ``dtype`` says otherwise. Parameters are gathered one layer slice at a time
    (``process_allgather`` where they span processes) and only process 0 writes, so the host holds
    at most one shard; every process of a multi-host run must call this. With ``tokenizer``, its files
    and chat template are written beside the weights, so the folder is a complete model source
    (`load_tokenizer` and ``AutoTokenizer`` load it).

    Args:
      model: the model to save (its parameters may be sharded on a mesh).
      config: its config (written as config.json).
      path: output folder (created if needed).
      max_shard_bytes: the largest safetensors file to write before splitting.
      dtype: export dtype (jnp.float32 or jnp.bfloat16); None: the parameters' own dtype.
      tokenizer: optional ``transformers`` tokenizer of the model (``save_pretrained`` is called by
        the writing process).
    """
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
    state = nnx.state(model, nnx.Param)
    export = None if dtype is None else jnp.dtype(_dtype_name(dtype, "save_hf_llama"))
    entries = []  # (hf name, table entry, layer index or None, nbytes)
    for t in _tensor_table(config):
        value = _get(state, t.path)
        per = int(np.prod(t.hf_shape(config))) * jnp.dtype(value.dtype if export is None else export).itemsize
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
            host = _gather(value if i is None else value[i])
            if writer:
                host = host if export is None else host.astype(export)
                tensors[name] = np.ascontiguousarray(t.to_hf(host, config))
            weight_map[name] = file
        if writer:
            save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
    if writer:
        _write_index_and_config(path, config, shards, entries, weight_map, export)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"save_hf_llama {path}")  # nobody reads a half-written folder


def _gather(value: jax.Array) -> np.ndarray:
    """The whole array on this host (an all-gather of this one tensor when it spans processes)."""
    if value.is_fully_addressable:
        return np.asarray(jax.device_get(value))
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def _write_index_and_config(path, config, shards, entries, weight_map, export) -> None:
    if len(shards) > 1:
        with open(os.path.join(path, _INDEX), "w") as f:
            json.dump({"metadata": {"total_size": sum(e[3] for e in entries)}, "weight_map": weight_map}, f, indent=2)
    hf_config = config.to_hf()
    if export is not None:
        hf_config.update(dtype=export.name, torch_dtype=export.name)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)


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
