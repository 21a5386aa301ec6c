"""cream_jax: JAX-native self-rewarding alignment (SRLM, CREAM, SeRA, SCIR) for LLaMA-family models."""

__version__ = "0.1.0"
