"""Self-rewarding methods as plug-ins of the one loop: one module per method, a registry by name.

``Run.method`` names one of :func:`registered` (METHODS.md): "cream", "srlm", "sera", "scir",
"dpo_oracle", any other module of this package (each registers itself when imported, and every
module here is imported below, so a new method is one new file), or a method registered from
outside the library with :func:`register`.
"""

import importlib
import pkgutil

from cream_jax.methods.base import Context, Method, Rewards, Selection, create, register, registered

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Context", "Method", "Rewards", "Selection", "create", "register", "registered"]
