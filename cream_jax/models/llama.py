"""LLaMA-family decoder in Flax NNX, numerically matching ``transformers.LlamaForCausalLM``.

Shape letters: B batch, T time (query positions), S cache slots (key positions), L layers,
N query heads, K key/value heads, G = N // K query heads per KV head, H head dim, D embed,
F mlp, V vocab.

Call API (the trainer, the sampler and the scorer depend on it):

* ``model(input_ids [B,T] int32, attention_mask [B,T] | None = None) -> logits [B,T,V] float32``.
  Positions count from the first real token, ``positions = max(cumsum(mask) - 1, 0)``, so
  left-padded prompts and "left padding + prompt + response + right padding" rows both work.
  Attention is causal and ignores padded keys. Padded query positions give finite garbage logits.
* Decode with a KV cache: ``cache = model.init_cache(batch, max_len)``, then
  ``logits, cache = model(ids [B,T], mask [B,T], cache=cache)`` writes T new slots at
  ``cache.index`` (prefill: the whole left-padded prompt; decode: one token per row). The cache
  is a plain pytree (:class:`KVCache`), so it can be carried through ``lax.while_loop``.
* Sampling R continuations per prompt: prefill a ``init_cache(B, P)`` with the prompts, then
  ``h [B*R,D], gen = model.decode_step(tokens [B*R], prefix, gen, index)`` with
  ``gen = model.init_gen_cache(B*R, slots)``: the prompt cache is shared by each prompt's R rows.
* ``model.hidden_states(ids, mask, cache=None) -> (h [B,T,D], cache)`` and
  ``model.logits(h) -> [..., V] float32`` split the call for callers that need only some logits.
* Pure-functional use: ``graphdef, params = nnx.split(model, nnx.Param)`` once, then
  ``nnx.merge(graphdef, params)(ids, mask)`` inside any jitted (and differentiated) function.

Layers are created stacked on a leading "layers" axis with ``nnx.vmap`` and run with
``jax.lax.scan`` (training and scoring), so compile time does not grow with depth. The cached
path (generation) unrolls the layers over per-layer cache buffers instead: see
``Llama.hidden_states``. Every parameter carries logical axis names (``cream_jax.sharding``);
the model itself never sees a mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cream_jax import sharding

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Parameters each supported rope scaling type needs (transformers' modeling_rope_utils names).
_ROPE_KEYS = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "linear": ("factor",),
}


def _rope_scaling_tuple(rope_scaling: Any, max_position_embeddings: int) -> tuple | None:
    """Normalises HF's rope scaling dict to a sorted, hashable tuple of (key, value) pairs."""
    if rope_scaling is None:
        return None
    items = dict(rope_scaling)
    kind = items.get("rope_type", items.get("type", "default"))
    if kind == "default":
        return None
    if kind not in _ROPE_KEYS:
        raise ValueError(f"LlamaConfig.rope_scaling: rope type {kind!r} is not supported (only 'llama3', 'linear')")
    if kind == "llama3":
        items.setdefault("original_max_position_embeddings", max_position_embeddings)
    missing = [k for k in _ROPE_KEYS[kind] if k not in items]
    if missing:
        raise ValueError(f"LlamaConfig.rope_scaling: rope type {kind!r} needs {missing}")
    return (("rope_type", kind),) + tuple((k, items[k]) for k in _ROPE_KEYS[kind])


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """LLaMA hyper-parameters with transformers' field names; frozen and hashable.

    ``rope_scaling`` is None or a hashable tuple of (key, value) pairs (a dict is converted);
    ``dtype`` ("float32" | "bfloat16") is the compute dtype (activations, KV cache) and
    ``param_dtype`` the dtype the parameters are stored in (None: ``dtype``). Mixed precision as in
    MaxText: float32 master parameters, cast to a bfloat16 ``dtype`` inside the forward, so the
    optimizer updates float32 values; logits and log-softmax are float32 either way.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: Any = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, (list, tuple)):
            set_("eos_token_id", tuple(int(e) for e in self.eos_token_id))
        set_("rope_scaling", _rope_scaling_tuple(self.rope_scaling, self.max_position_embeddings))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name}: must be a positive int, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LlamaConfig.num_attention_heads: {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim: rotary embeddings need an even head_dim, got {self.head_dim}")
        for name, value in (("dtype", self.dtype), ("param_dtype", self.stored_dtype)):
            if value not in _DTYPES:
                raise ValueError(f"LlamaConfig.{name}: must be one of {sorted(_DTYPES)}, got {value!r}")

    @property
    def jnp_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    @property
    def stored_dtype(self) -> str:
        """The parameters' dtype name: ``param_dtype``, or ``dtype`` when that is None."""
        return self.param_dtype or self.dtype

    @property
    def jnp_param_dtype(self) -> Any:
        return _DTYPES[self.stored_dtype]

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """EOS token ids as a tuple (empty when the config has none)."""
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (int(self.eos_token_id),)

    @classmethod
    def from_hf(cls, hf_config: Any, dtype: str = "float32", param_dtype: str | None = None) -> "LlamaConfig":
        """Builds a config from a transformers config object or a config.json dict.

        Reads both the transformers>=5 ``rope_parameters`` form and the older
        ``rope_theta`` + ``rope_scaling`` form. Raises ValueError for other architectures.
        """
        d = dict(hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config)
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"LlamaConfig.from_hf: model_type {d.get('model_type')!r} is not 'llama'")
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        if "LlamaForCausalLM" not in archs:
            raise ValueError(f"LlamaConfig.from_hf: architectures {archs} do not include LlamaForCausalLM")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"LlamaConfig.from_hf: hidden_act {d.get('hidden_act')!r} is not 'silu'")
        rope = d.get("rope_parameters")
        if rope:
            rope_theta, rope_scaling = rope.get("rope_theta", d.get("rope_theta", 10000.0)), rope
        else:
            rope_theta, rope_scaling = d.get("rope_theta", 10000.0), d.get("rope_scaling")
        fields = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "rope_scaling", "dtype", "param_dtype"}
        kwargs = {k: d[k] for k in fields if k in d}
        return cls(**kwargs, rope_theta=float(rope_theta), rope_scaling=rope_scaling, dtype=dtype,
                   param_dtype=param_dtype)

    def to_hf(self) -> dict:
        """A config.json dict that ``transformers.LlamaForCausalLM`` loads (v5 and older)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.pop("dtype")
        d.pop("param_dtype")
        rope = dict(self.rope_scaling or (("rope_type", "default"),))
        d["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        # transformers>=5 reads rope_parameters; older versions read rope_theta and rope_scaling.
        d["rope_parameters"] = {**rope, "rope_theta": self.rope_theta}
        d["rope_scaling"] = None if self.rope_scaling is None else rope
        d.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                 dtype=self.stored_dtype, torch_dtype=self.stored_dtype)  # the stored weights' dtype
        return d


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse RoPE frequencies [H/2] float32, computed as transformers' modeling_rope_utils does."""
    dim = config.head_dim
    inv = np.float32(1.0) / (np.float32(config.rope_theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)))
    if config.rope_scaling is None:
        return inv
    p = dict(config.rope_scaling)
    if p["rope_type"] == "linear":
        return (inv / np.float32(p["factor"])).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = np.float32(2 * math.pi) / inv
    inv_l = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv)
    smooth = (np.float32(old_len) / wavelen - np.float32(low)) / np.float32(high - low)
    smoothed = (1 - smooth) * inv_l / np.float32(factor) + smooth * inv_l
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, inv_l).astype(np.float32)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal(key: jax.Array, shape: tuple, dtype: Any, std: float) -> jax.Array:
    # One compiled op per parameter shape (eager init would compile normal, scale and cast apiece).
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _param(rngs: nnx.Rngs | None, shape: tuple, names: tuple, dtype: Any, std: float | None) -> nnx.Param:
    """A parameter with logical axis names; ``std=None`` means ones (norms), 0.0 means zeros (biases)."""
    if std is None:
        value = jnp.ones(shape, dtype)
    elif std == 0.0:
        value = jnp.zeros(shape, dtype)
    else:
        value = _normal(rngs.params(), shape, dtype, std)
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def cast_floating(tree: Any, dtype: Any) -> Any:
    """``tree`` with its floating-point leaves in ``dtype`` (integer leaves untouched).

    The forward casts stored (master) parameters to the compute dtype with this; applied once to
    a model's parameters it gives a compute-dtype copy for a model that is only scored or sampled
    (half the memory of float32 masters; ``nnx.merge`` with the same graphdef runs it).
    """
    def one(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x

    return jax.tree.map(one, tree)


REMAT_MODES = ("none", "full", "matmuls")


def remat_mode(remat: bool | str | None) -> str:
    """``Llama.remat`` as one of REMAT_MODES (False/None -> "none", True -> "full")."""
    mode = {False: "none", True: "full", None: "none"}.get(remat, remat) if not isinstance(remat, str) else remat
    if mode not in REMAT_MODES:
        raise ValueError(f"Llama.remat: must be a bool or one of {REMAT_MODES}, got {remat!r}")
    return mode


def _rematted(fn: Any, remat: bool | str | None) -> Any:
    """``fn`` under ``jax.checkpoint`` as ``remat`` says: "full" saves only the layer inputs (the
    scan carry); "matmuls" also saves the outputs of the weight matmuls (the dots without batch
    dimensions), so the backward pass recomputes only the cheap elementwise work and attention."""
    mode = remat_mode(remat)
    if mode == "none":
        return fn
    policy = None if mode == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    # prevent_cse=False: inside a scan the loop already keeps XLA from merging the recomputation away.
    return jax.checkpoint(fn, policy=policy, prevent_cse=False)


def _batch_rows(x_btd: jax.Array) -> jax.Array:
    """The residual stream split over rows at each block boundary (no-op without a mesh): FSDP then
    gathers each layer's weights instead of replicating the batch (`cream_jax.sharding.constrain`)."""
    return sharding.constrain(x_btd, ("batch", "length", "act_embed"))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32 and cast back before the scale, as transformers does."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * x32.astype(x.dtype)


def _rotate(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    """Rotary embedding in transformers' rotate-half convention (no weight permutation needed)."""
    half = x_btnh.shape[-1] // 2
    rot = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    return x_btnh * cos_bth[:, :, None] + rot * sin_bth[:, :, None]


class KVCache(NamedTuple):
    """Decode state: keys/values of every layer, which slots hold real tokens, next free slot."""

    k: tuple[jax.Array, ...]  # L arrays [B, K, S, H]
    v: tuple[jax.Array, ...]  # L arrays [B, K, S, H]
    mask: jax.Array  # [B, S] int32, 1 where a slot holds a real (non-pad) token
    index: jax.Array  # [] int32, the first slot the next call writes


class GenCache(NamedTuple):
    """Keys/values of the generated tokens for :meth:`Llama.decode_step` (the prompt part is a KVCache)."""

    k: tuple[jax.Array, ...]  # L arrays [B*R, K, S, H]
    v: tuple[jax.Array, ...]  # L arrays [B*R, K, S, H]


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c, dt, std = config, config.jnp_param_dtype, config.initializer_range
        D, N, K, H = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.wq = _param(rngs, (D, N, H), ("embed", "heads", "head_dim"), dt, std)
        self.wk = _param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), dt, std)
        self.wv = _param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), dt, std)
        self.wo = _param(rngs, (N, H, D), ("heads", "head_dim", "embed"), dt, std)
        if c.attention_bias:
            self.bq = _param(rngs, (N, H), ("heads", "head_dim"), dt, 0.0)
            self.bk = _param(rngs, (K, H), ("kv_heads", "head_dim"), dt, 0.0)
            self.bv = _param(rngs, (K, H), ("kv_heads", "head_dim"), dt, 0.0)
            self.bo = _param(rngs, (D,), ("embed",), dt, 0.0)
        self.bias = c.attention_bias
        self.num_kv_heads = K

    def __call__(self, x_btd, cos_bth, sin_bth, bias_bts, kv=None, index=None):
        """Attention over the T new positions, or over the S cache slots when ``kv`` is given.

        Args:
          x_btd: [B,T,D] normalised hidden states.
          cos_bth, sin_bth: [B,T,H] rotary tables at each query's position.
          bias_bts: [B,T,S] float32 attention bias: 0 where query t may attend key s, the most
            negative finite float elsewhere (finite, so fully masked padding rows stay NaN-free).
            S = T without a cache.
          kv: optional (k [B,K,S,H], v [B,K,S,H]) cache of this layer.
          index: [] int32 slot where the T new keys and values are written into ``kv``.

        Returns:
          (out [B,T,D], (k, v) with the new keys and values written in, or None without a cache).
        """
        # Projections and rotary embedding in the natural [B,T,N,H] layout (dense dots, contiguous
        # elementwise work), then heads-major [B,N,T,H] (cache [B,K,S,H]) for the attention dots.
        q_btnh = jnp.einsum("btd,dnh->btnh", x_btd, self.wq[...])
        k_btkh = jnp.einsum("btd,dkh->btkh", x_btd, self.wk[...])
        v_btkh = jnp.einsum("btd,dkh->btkh", x_btd, self.wv[...])
        if self.bias:
            q_btnh, k_btkh, v_btkh = q_btnh + self.bq[...], k_btkh + self.bk[...], v_btkh + self.bv[...]
        q_bnth = _rotate(q_btnh, cos_bth, sin_bth).transpose(0, 2, 1, 3)
        k_bkth = _rotate(k_btkh, cos_bth, sin_bth).transpose(0, 2, 1, 3)
        v_bkth = v_btkh.transpose(0, 2, 1, 3)
        if kv is None:
            k_bksh, v_bksh, new_kv = k_bkth, v_bkth, None
        else:
            # Write only the T new slots (in place inside a decode loop).
            k_bksh = jax.lax.dynamic_update_slice(kv[0], k_bkth.astype(kv[0].dtype), (0, 0, index, 0))
            v_bksh = jax.lax.dynamic_update_slice(kv[1], v_bkth.astype(kv[1].dtype), (0, 0, index, 0))
            new_kv = (k_bksh, v_bksh)
        B, N, T, H = q_bnth.shape
        K = self.num_kv_heads
        # Query head n reads KV head n // G (transformers' repeat_kv), hence the (K, G) split.
        q_bkgth = q_bnth.reshape(B, K, N // K, T, H)
        # Scores and softmax in float32 (transformers upcasts the softmax too). The mask enters as
        # an additive bias and the softmax is normalised after the value product: on CPU this
        # fuses into the dots and made attention 3x faster than where() + jax.nn.softmax.
        s_bkgts = jnp.einsum("bkgth,bksh->bkgts", q_bkgth * (H ** -0.5), k_bksh, preferred_element_type=jnp.float32)
        s_bkgts = s_bkgts + bias_bts[:, None, None]
        e_bkgts = jnp.exp(s_bkgts - jnp.max(s_bkgts, axis=-1, keepdims=True))
        o_bkgth = jnp.einsum("bkgts,bksh->bkgth", e_bkgts.astype(v_bksh.dtype), v_bksh,
                             preferred_element_type=jnp.float32)
        o_bkgth = (o_bkgth / jnp.sum(e_bkgts, axis=-1)[..., None]).astype(v_bksh.dtype)
        out_btd = jnp.einsum("bnth,nhd->btd", o_bkgth.reshape(B, N, T, H), self.wo[...])
        if self.bias:
            out_btd = out_btd + self.bo[...]
        return out_btd, new_kv

    def decode(self, x_rd, cos_rh, sin_rh, prefix_kv, prefix_bias_bp, gen_kv, gen_bias_s, index, w_qkv):
        """One new token per row over a prompt cache shared by the R rows (samples) of each prompt.

        Row r = b * R + i is sample i of prompt b. Its query attends to prompt b's cached keys
        (stored once, not R times) and to its own generated keys, with one joint softmax. The R
        samples' queries are folded into the query axis of the prompt part, so that part is one
        [R*G, H] x [H, P] dot per (prompt, KV head) instead of R*K dots of one query row each, and
        reads the prompt cache once instead of R times.

        Args:
          x_rd: [B*R, D] normalised hidden states of the new tokens.
          cos_rh, sin_rh: [B*R, H] rotary tables at each row's position.
          prefix_kv: (k [B,K,P,H], v [B,K,P,H]) the prompts' cache of this layer.
          prefix_bias_bp: [B,P] float32 bias, 0 for real prompt tokens, very negative for padding.
          gen_kv: (k [B*R,K,S,H], v [B*R,K,S,H]) the generated tokens' cache of this layer.
          gen_bias_s: [S] float32 bias, 0 for slots <= ``index`` (written), very negative after.
          index: [] int32 slot of ``gen_kv`` where the new key and value are written.
          w_qkv: [D, (N+2K)*H] wq|wk|wv concatenated once outside the decode loop
            (``Llama.unstack_layers``): one dot instead of three.

        Returns:
          (out [B*R,D], gen_kv with the new key and value written in).
        """
        BR, D = x_rd.shape
        B, K, P, H = prefix_kv[0].shape
        N, R = self.wq.shape[1], BR // B
        G = N // K
        qkv_rj = x_rd @ w_qkv
        q_rnh = qkv_rj[:, :N * H].reshape(BR, N, H)
        k_rkh = qkv_rj[:, N * H:(N + K) * H].reshape(BR, K, H)
        v_rkh = qkv_rj[:, (N + K) * H:].reshape(BR, K, H)
        if self.bias:
            q_rnh, k_rkh, v_rkh = q_rnh + self.bq[...], k_rkh + self.bk[...], v_rkh + self.bv[...]
        q_rnh = _rotate(q_rnh[:, None], cos_rh[:, None], sin_rh[:, None])[:, 0]
        k_rkh = _rotate(k_rkh[:, None], cos_rh[:, None], sin_rh[:, None])[:, 0]
        gk_rksh = jax.lax.dynamic_update_slice(gen_kv[0], k_rkh[:, :, None].astype(gen_kv[0].dtype), (0, 0, index, 0))
        gv_rksh = jax.lax.dynamic_update_slice(gen_kv[1], v_rkh[:, :, None].astype(gen_kv[1].dtype), (0, 0, index, 0))
        pk_bkph, pv_bkph = prefix_kv
        q_rkgh = (q_rnh * (H ** -0.5)).reshape(BR, K, G, H)
        # Prompt part: the R samples x G heads of a prompt's KV head form the query axis Q = R*G.
        q_bkqh = q_rkgh.reshape(B, R, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, R * G, H)
        sp_bkqp = jnp.einsum("bkqh,bkph->bkqp", q_bkqh, pk_bkph, preferred_element_type=jnp.float32)
        sp_bkqp = sp_bkqp + prefix_bias_bp[:, None, None]
        sg_rkgs = jnp.einsum("rkgh,rksh->rkgs", q_rkgh, gk_rksh, preferred_element_type=jnp.float32)
        sg_rkgs = sg_rkgs + gen_bias_s
        # One softmax over both parts: a common max, exp, the two value products, one normaliser
        # (the same sums as over the concatenated [P + S] keys, as __call__ computes them).
        to_r = lambda a_bkq: a_bkq.reshape(B, K, R, G).transpose(0, 2, 1, 3).reshape(BR, K, G)  # noqa: E731
        m_rkg = jnp.maximum(to_r(jnp.max(sp_bkqp, axis=-1)), jnp.max(sg_rkgs, axis=-1))
        m_bkq = m_rkg.reshape(B, R, K, G).transpose(0, 2, 1, 3).reshape(B, K, R * G)
        ep_bkqp = jnp.exp(sp_bkqp - m_bkq[..., None])
        eg_rkgs = jnp.exp(sg_rkgs - m_rkg[..., None])
        op_bkqh = jnp.einsum("bkqp,bkph->bkqh", ep_bkqp.astype(pv_bkph.dtype), pv_bkph,
                             preferred_element_type=jnp.float32)
        og_rkgh = jnp.einsum("rkgs,rksh->rkgh", eg_rkgs.astype(gv_rksh.dtype), gv_rksh,
                             preferred_element_type=jnp.float32)
        op_rkgh = op_bkqh.reshape(B, K, R, G, H).transpose(0, 2, 1, 3, 4).reshape(BR, K, G, H)
        sum_rkg = to_r(jnp.sum(ep_bkqp, axis=-1)) + jnp.sum(eg_rkgs, axis=-1)
        o_rkgh = ((op_rkgh + og_rkgh) / sum_rkg[..., None]).astype(gv_rksh.dtype)
        # A 2-D dot over the flattened (n, h): the einsum "rnh,nhd->rd" made XLA transpose wo
        # every step (a copy of each layer's [N*H, D] weights: 36% of a SmolLM2-shape step).
        out_rd = o_rkgh.reshape(BR, N * H) @ self.wo[...].reshape(N * H, D)
        if self.bias:
            out_rd = out_rd + self.bo[...]
        return out_rd, (gk_rksh, gv_rksh)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c, dt, std = config, config.jnp_param_dtype, config.initializer_range
        D, F = c.hidden_size, c.intermediate_size
        self.w_gate = _param(rngs, (D, F), ("embed", "mlp"), dt, std)
        self.w_up = _param(rngs, (D, F), ("embed", "mlp"), dt, std)
        self.w_down = _param(rngs, (F, D), ("mlp", "embed"), dt, std)
        if c.mlp_bias:
            self.b_gate = _param(rngs, (F,), ("mlp",), dt, 0.0)
            self.b_up = _param(rngs, (F,), ("mlp",), dt, 0.0)
            self.b_down = _param(rngs, (D,), ("embed",), dt, 0.0)
        self.bias = c.mlp_bias

    def __call__(self, x_btd, w_gate_up=None):
        """[..., D] -> [..., D]. ``w_gate_up``: optional [D, 2F] w_gate|w_up concatenated once outside a
        decode loop (``Llama.unstack_layers``): one wider dot instead of two."""
        if w_gate_up is None:
            gate_btf = jnp.einsum("...d,df->...f", x_btd, self.w_gate[...])
            up_btf = jnp.einsum("...d,df->...f", x_btd, self.w_up[...])
        else:
            gate_btf, up_btf = jnp.split(x_btd @ w_gate_up, 2, axis=-1)
        if self.bias:
            gate_btf, up_btf = gate_btf + self.b_gate[...], up_btf + self.b_up[...]
        out_btd = jnp.einsum("...f,fd->...d", jax.nn.silu(gate_btf) * up_btf, self.w_down[...])
        return out_btd + self.b_down[...] if self.bias else out_btd


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        D, dt = config.hidden_size, config.jnp_param_dtype
        self.input_norm = _param(rngs, (D,), ("norm",), dt, None)
        self.attn = Attention(config, rngs=rngs)
        self.post_attn_norm = _param(rngs, (D,), ("norm",), dt, None)
        self.mlp = MLP(config, rngs=rngs)
        self.eps = config.rms_norm_eps

    def __call__(self, x_btd, cos_bth, sin_bth, bias_bts, kv=None, index=None):
        a_btd, kv = self.attn(rms_norm(x_btd, self.input_norm[...], self.eps), cos_bth, sin_bth, bias_bts, kv, index)
        x_btd = x_btd + a_btd
        x_btd = x_btd + self.mlp(rms_norm(x_btd, self.post_attn_norm[...], self.eps))
        return x_btd, kv

    def decode(self, x_rd, cos_rh, sin_rh, prefix_kv, prefix_bias_bp, gen_kv, gen_bias_s, index, fused):
        """:meth:`Attention.decode` in the pre-norm block: [B*R,D] -> ([B*R,D], gen_kv).

        ``fused``: (wq|wk|wv [D,(N+2K)*H], w_gate|w_up [D,2F]) from ``Llama.unstack_layers``.
        """
        w_qkv, w_gate_up = fused
        a_rd, gen_kv = self.attn.decode(rms_norm(x_rd, self.input_norm[...], self.eps), cos_rh, sin_rh, prefix_kv,
                                        prefix_bias_bp, gen_kv, gen_bias_s, index, w_qkv)
        x_rd = x_rd + a_rd
        return x_rd + self.mlp(rms_norm(x_rd, self.post_attn_norm[...], self.eps), w_gate_up), gen_kv


class Llama(nnx.Module):
    """LLaMA causal LM. See the module docstring for the call API.

    Args:
      config: the model's hyper-parameters.
      rngs: random streams for the initial parameters (normal(0, initializer_range)).
      remat: recompute layer activations in the backward pass (``jax.checkpoint`` around the
        scanned layer), trading compute for training memory: False/"none", True/"full" (keep only
        each layer's input), or "matmuls" (also keep the weight matmuls' outputs). A plain
        attribute, part of the graphdef: ``model.remat = "full"`` works too.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, remat: bool | str = False):
        c, dt, std = config, config.jnp_param_dtype, config.initializer_range
        self.config = config
        remat_mode(remat)  # a bad value fails here, not at the first backward pass
        self.remat = remat
        self.embed = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), dt, std)

        @nnx.split_rngs(splits=c.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return DecoderLayer(c, rngs=rngs)

        self.layers = make_layers(rngs)
        self.final_norm = _param(rngs, (c.hidden_size,), ("norm",), dt, None)
        if not c.tie_word_embeddings:
            self.lm_head = _param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), dt, std)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache for ``batch`` rows and ``max_len`` slots (prompt + new tokens)."""
        c = self.config
        shape = (batch, c.num_key_value_heads, max_len, c.head_dim)
        return KVCache(
            k=tuple(jnp.zeros(shape, c.jnp_dtype) for _ in range(c.num_hidden_layers)),
            v=tuple(jnp.zeros(shape, c.jnp_dtype) for _ in range(c.num_hidden_layers)),
            mask=jnp.zeros((batch, max_len), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    def init_gen_cache(self, rows: int, slots: int) -> GenCache:
        """An empty cache of generated tokens for :meth:`decode_step`: ``rows`` = B*R, ``slots`` new tokens."""
        c = self.config
        shape = (rows, c.num_key_value_heads, slots, c.head_dim)
        L = c.num_hidden_layers
        return GenCache(tuple(jnp.zeros(shape, c.jnp_dtype) for _ in range(L)),
                        tuple(jnp.zeros(shape, c.jnp_dtype) for _ in range(L)))

    def unstack_layers(self) -> tuple[tuple[DecoderLayer, tuple[jax.Array, jax.Array]], ...]:
        """Per layer: the module with its slice of the [L, ...] parameters, and (wq|wk|wv, w_gate|w_up).

        Build once before a decode loop and pass to :meth:`decode_step`: XLA does not hoist the
        slices out of a ``while_loop``, so slicing inside it copies every weight matrix every step
        (measured: 9% of the 10M model's decode step). The concatenated weights [D,(N+2K)*H] and
        [D,2F] make one dot of the three projections and one of gate and up (fewer, wider dots).
        """
        layer_def, layer_state = nnx.split(self.layers)
        dt = self.config.jnp_dtype
        out = []
        for i in range(self.config.num_hidden_layers):
            block = nnx.merge(layer_def, cast_floating(jax.tree.map(lambda x, i=i: x[i], layer_state), dt))
            a, m = block.attn, block.mlp
            D = a.wq.shape[0]
            w_qkv = jnp.concatenate([a.wq[...].reshape(D, -1), a.wk[...].reshape(D, -1), a.wv[...].reshape(D, -1)], 1)
            out.append((block, (w_qkv, jnp.concatenate([m.w_gate[...], m.w_up[...]], 1))))
        return tuple(out)

    def stack_layers(self) -> tuple[Any, Any, tuple[jax.Array, jax.Array]]:
        """The scanned form of :meth:`unstack_layers`: (layer graphdef, [L,...] layer state,
        (wq|wk|wv [L,D,(N+2K)*H], w_gate|w_up [L,D,2F])), for :meth:`decode_step` over stacked caches."""
        layer_def, layer_state = nnx.split(self.layers)
        layer_state = cast_floating(layer_state, self.config.jnp_dtype)  # the compute dtype, as unstack_layers
        stacked = nnx.merge(layer_def, layer_state)
        a, m = stacked.attn, stacked.mlp
        L, D = a.wq.shape[:2]
        w_qkv = jnp.concatenate([a.wq[...].reshape(L, D, -1), a.wk[...].reshape(L, D, -1),
                                 a.wv[...].reshape(L, D, -1)], 2)
        return layer_def, layer_state, (w_qkv, jnp.concatenate([m.w_gate[...], m.w_up[...]], 2))

    def decode_step(self, tokens_r: jax.Array, prefix: KVCache, gen: GenCache, index: jax.Array,
                    layers: tuple | None = None):
        """One generated token per row, with each prompt's cache shared by its R samples.

        ``prefix`` is the cache of the B prompts after prefill (``init_cache(B, P)`` filled by
        ``hidden_states``); row r = b * R + i of ``tokens_r`` is sample i of prompt b and the
        ``index``-th token it generates (position = real prompt length + index). The token's key
        and value go to slot ``index`` of ``gen``; generated slots after ``index`` are ignored, so
        ``gen`` may have any number of slots > ``index``. Equals ``hidden_states`` with a
        ``KVCache`` holding the prompt repeated R times followed by the generated tokens.

        Args:
          tokens_r: [B*R] int32 tokens.
          prefix: the prompts' KVCache (k, v: L x [B,K,P,H]; mask [B,P]).
          gen: the generated tokens' GenCache (k, v: L x [B*R,K,S,H]).
          index: [] int32, the number of tokens each row generated before this one.
          layers: :meth:`unstack_layers`, computed once outside the decode loop (default: here).

        Scanned form: when ``gen.k`` / ``gen.v`` / ``prefix.k`` / ``prefix.v`` are single stacked
        [L, ...] arrays instead of tuples, the layers run in one ``lax.scan`` (one compiled copy of
        the layer instead of L) and ``layers`` is :meth:`stack_layers`; the result is stacked too.

        Returns:
          (final-norm hidden states [B*R,D], gen with the new keys and values written in).
        """
        BR = tokens_r.shape[0]
        B = prefix.mask.shape[0]
        positions_r = jnp.repeat(jnp.sum(prefix.mask, axis=1), BR // B) + index
        cos_r1h, sin_r1h = self._rope(positions_r[:, None])
        minf = jnp.finfo(jnp.float32).min
        prefix_bias_bp = jnp.where(prefix.mask > 0, 0.0, minf)
        gen_bias_s = jnp.where(jnp.arange(gen.k[0].shape[2]) <= index, 0.0, minf)
        x_rd = jnp.take(self.embed[...], tokens_r, axis=0).astype(self.config.jnp_dtype)
        cos_rh, sin_rh = cos_r1h[:, 0], sin_r1h[:, 0]
        if not isinstance(gen.k, tuple):  # stacked [L, ...] caches: scan over layers
            layer_def, layer_state, fused = self.stack_layers() if layers is None else layers

            def body(x_rd, xs):
                state, fused_l, pk, pv, gk, gv = xs
                return nnx.merge(layer_def, state).decode(x_rd, cos_rh, sin_rh, (pk, pv), prefix_bias_bp,
                                                          (gk, gv), gen_bias_s, index, fused_l)

            x_rd, (ks, vs) = jax.lax.scan(body, x_rd, (layer_state, fused, prefix.k, prefix.v, gen.k, gen.v))
            return rms_norm(x_rd, self.final_norm[...], self.config.rms_norm_eps), GenCache(ks, vs)
        ks, vs = [], []
        for layer, (block, fused) in enumerate(self.unstack_layers() if layers is None else layers):  # unrolled
            x_rd, (k, v) = block.decode(x_rd, cos_rh, sin_rh, (prefix.k[layer], prefix.v[layer]),
                                        prefix_bias_bp, (gen.k[layer], gen.v[layer]), gen_bias_s, index, fused)
            ks.append(k)
            vs.append(v)
        final_norm = self.final_norm[...].astype(self.config.jnp_dtype)
        return rms_norm(x_rd, final_norm, self.config.rms_norm_eps), GenCache(tuple(ks), tuple(vs))

    def _rope(self, positions_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
        inv_freq = jnp.asarray(rope_inv_freq(self.config))  # [H/2]
        freqs_bth = positions_bt.astype(jnp.float32)[..., None] * inv_freq
        freqs_bth = jnp.concatenate([freqs_bth, freqs_bth], axis=-1)  # [B,T,H]
        dt = self.config.jnp_dtype
        return jnp.cos(freqs_bth).astype(dt), jnp.sin(freqs_bth).astype(dt)

    def hidden_states(self, input_ids, attention_mask=None, *, cache: KVCache | None = None):
        """Final-norm hidden states [B,T,D] and the updated cache (None without one)."""
        B, T = input_ids.shape
        mask_bt = jnp.ones((B, T), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
        if cache is None:
            positions_bt = jnp.cumsum(mask_bt, axis=1) - 1
            key_mask_bs, q_slot_t, k_slot_s = mask_bt, jnp.arange(T), jnp.arange(T)
        else:
            # Real tokens already cached count towards this row's positions.
            positions_bt = jnp.sum(cache.mask, axis=1, keepdims=True) + jnp.cumsum(mask_bt, axis=1) - 1
            key_mask_bs = jax.lax.dynamic_update_slice(cache.mask, mask_bt, (0, cache.index))
            q_slot_t, k_slot_s = cache.index + jnp.arange(T), jnp.arange(cache.mask.shape[1])
        positions_bt = jnp.maximum(positions_bt, 0)
        cos_bth, sin_bth = self._rope(positions_bt)
        mask_bts = (k_slot_s[None, None, :] <= q_slot_t[None, :, None]) & (key_mask_bs[:, None, :] > 0)
        bias_bts = jnp.where(mask_bts, 0.0, jnp.finfo(jnp.float32).min)

        dt = self.config.jnp_dtype
        x_btd = _batch_rows(jnp.take(self.embed[...], input_ids, axis=0).astype(dt))
        layer_def, layer_state = nnx.split(self.layers)

        def layer_fn(state, x_btd, kv=None, index=None):
            # Master weights are cast to the compute dtype one layer at a time (inside the remat).
            x_btd, kv = nnx.merge(layer_def, cast_floating(state, dt))(x_btd, cos_bth, sin_bth, bias_bts, kv, index)
            return _batch_rows(x_btd), kv

        layer_fn = _rematted(layer_fn, self.remat)

        if cache is None:
            def body(x_btd, state):
                return layer_fn(state, x_btd)[0], None

            x_btd, _ = jax.lax.scan(body, x_btd, layer_state)
            new_cache = None
        else:
            # Generation unrolls the layers over per-layer cache buffers: a scan would slice its
            # layer out of a stacked [L,...] cache, and on CPU XLA copies such slices before each
            # attention dot, every decode step (measured: that copy dominated the step time).
            ks, vs = [], []
            for layer in range(self.config.num_hidden_layers):
                state = jax.tree.map(lambda x: x[layer], layer_state)
                x_btd, (k, v) = layer_fn(state, x_btd, (cache.k[layer], cache.v[layer]), cache.index)
                ks.append(k)
                vs.append(v)
            new_cache = KVCache(tuple(ks), tuple(vs), key_mask_bs, cache.index + T)
        return rms_norm(x_btd, self.final_norm[...].astype(dt), self.config.rms_norm_eps), new_cache

    def logits(self, h: jax.Array, head: jax.Array | None = None) -> jax.Array:
        """Vocabulary logits [..., V] in float32 from hidden states [..., D]; ``head``: the
        :meth:`head_weights` computed once outside a decode loop (default: here)."""
        if head is not None:
            return jnp.einsum("...d,dv->...v", h, head, preferred_element_type=jnp.float32)
        if self.config.tie_word_embeddings:
            return jnp.einsum("...d,vd->...v", h, self.embed[...].astype(h.dtype), preferred_element_type=jnp.float32)
        return jnp.einsum("...d,dv->...v", h, self.lm_head[...].astype(h.dtype), preferred_element_type=jnp.float32)

    def head_weights(self) -> jax.Array:
        """The LM head [D, V] in the compute dtype, gathered whole on every device: one copy for
        a whole scanned decode. Left inside the loops, XLA hoists an FSDP gather of it out of each
        decode segment's loop and keeps every copy (48 segments at 768 new tokens: ~100 GB per
        device at 8B on XLA:CPU, which gathers it in float32)."""
        w_dv = self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return sharding.constrain(w_dv.astype(self.config.jnp_dtype), (None, None))

    def __call__(self, input_ids, attention_mask=None, *, cache: KVCache | None = None):
        """Logits [B,T,V] float32, or ``(logits, cache)`` when a cache is passed."""
        h_btd, new_cache = self.hidden_states(input_ids, attention_mask, cache=cache)
        logits_btv = self.logits(h_btd)
        return logits_btv if cache is None else (logits_btv, new_cache)
