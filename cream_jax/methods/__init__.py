"""Self-rewarding methods as plug-ins of the one loop: one module per method, a registry by name.

``Run.method`` names one of :func:`registered` (METHODS.md): "cream", "srlm", "sera", "scir",
"dpo_oracle", "length_control" (any of them with a length-controlled reward), "meta_rewarding", or a
method registered from outside the library with :func:`register`.
"""

from cream_jax.methods.base import Context, Method, Rewards, Selection, create, register, registered
from cream_jax.methods import cream, dpo_oracle, length_control, meta_rewarding, scir, sera, srlm  # noqa: F401  (they register themselves)

__all__ = ["Context", "Method", "Rewards", "Selection", "create", "register", "registered"]
