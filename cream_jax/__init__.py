"""cream_jax: JAX-native self-rewarding alignment (SRLM, CREAM, SeRA, SCIR) for LLaMA-family models.

The public API (DESIGN.md); everything else is reached through its module.
"""

from cream_jax.consistency import consistency_rate, kendall_tau, spearman, top_order
from cream_jax.losses import consistency_dpo_loss, dpo_loss, scir_loss, sft_loss
from cream_jax.models.hf import load_hf_llama, load_tokenizer, save_hf_llama
from cream_jax.models.llama import Llama, LlamaConfig
from cream_jax.preference import build_pairs, select_by_margin
from cream_jax.sampling import generate
from cream_jax.scoring import sequence_logprobs
from cream_jax.sharding import make_mesh

__version__ = "0.1.0"

__all__ = [
    "Llama", "LlamaConfig", "build_pairs", "consistency_dpo_loss", "consistency_rate", "dpo_loss", "generate",
    "kendall_tau", "load_hf_llama", "load_tokenizer", "make_mesh", "save_hf_llama", "scir_loss", "select_by_margin",
    "sequence_logprobs", "sft_loss", "spearman", "top_order",
]
