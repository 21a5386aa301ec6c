"""Mesh construction and the one logical-axis rules table.

Model code names every parameter axis logically (``("embed", "mlp")``); this module alone maps
logical names to mesh axes. The mesh always has the three axes ``("data", "fsdp", "tensor")``;
on one device every axis has size 1 and all of this is a no-op by construction.

Activations are constrained by logical names too (`constrain`, at block boundaries), against the
mesh the phase program is traced under (`on_mesh`); without one (eager, single-device use) that is
a no-op. Without these constraints XLA keeps FSDP's embed-sharded weights in place and replicates
the batch instead (partial sums all-reduced): per-device FLOPs still fall, activation memory does not.

Logical names used by the code base:
  batch     examples (prompts, pairs)            -> ("data", "fsdp")
  length    sequence positions                   -> replicated
  vocab     vocabulary                           -> "tensor"
  embed     model width D                        -> "fsdp"
  mlp       MLP hidden F                         -> "tensor"
  heads     query heads N                        -> "tensor"
  kv_heads  key/value heads K                    -> "tensor"
  head_dim  per-head width H                     -> replicated
  layers    the scanned layer axis L             -> replicated
  norm      RMSNorm scales (1-D)                 -> replicated
  act_embed activations' width D                 -> replicated (weights are gathered, not activations)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# The single rules table: logical axis name -> mesh axis (or tuple of mesh axes, or None).
LOGICAL_AXIS_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "act_embed": None,
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a ``("data", "fsdp", "tensor")`` mesh.

    One axis may be -1: it takes all devices left over by the other two.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if len(devices) % rest:
            raise ValueError(f"make_mesh: {len(devices)} devices are not divisible by the fixed axes' product {rest}")
        sizes[sizes.index(-1)] = len(devices) // rest
    if any(s < 1 for s in sizes):
        raise ValueError(f"make_mesh: axis sizes must be >= 1 or -1, got data={data} fsdp={fsdp} tensor={tensor}")
    size = math.prod(sizes)
    if size > len(devices):
        raise ValueError(
            f"make_mesh: mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {size} devices, "
            f"only {len(devices)} available"
        )
    grid = np.asarray(devices[:size]).reshape(*sizes)
    return Mesh(grid, MESH_AXES)


def single_device_mesh() -> Mesh:
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _mesh_axis_size(mesh: Mesh, axis: Any) -> int:
    if axis is None:
        return 1
    if isinstance(axis, tuple):
        return math.prod(mesh.shape[a] for a in axis)
    return mesh.shape[axis]


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> P:
    """Maps logical axis names to a mesh ``PartitionSpec``.

    Raises on an unknown logical name (a parameter the rules forgot must fail, not silently replicate).
    With ``shape`` and ``mesh`` given, a dimension not divisible by its mesh axes is replicated instead
    (e.g. 2 KV heads on a tensor axis of 4), and a mesh axis is never used twice in one spec.
    """
    out: list[Any] = []
    used: set[str] = set()
    for i, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in LOGICAL_AXIS_RULES:
            raise ValueError(f"sharding: logical axis {name!r} is not in LOGICAL_AXIS_RULES")
        axis = LOGICAL_AXIS_RULES[name]
        members = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
        if any(m in used for m in members):
            axis = None
        elif shape is not None and mesh is not None and shape[i] % _mesh_axis_size(mesh, axis):
            axis = None
        if axis is not None:
            used.update(members)
        out.append(axis)
    return P(*out)


def _names_of(variable: nnx.Variable) -> tuple | None:
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    for key in ("sharding_names", "out_sharding", "sharding"):
        names = meta.get(key)
        if names is not None:
            return tuple(names)
    return None


def param_logical_names(state: nnx.State) -> Any:
    """Tree of logical-name tuples (or None) for an ``nnx.State`` of Variables."""
    return jax.tree.map(_names_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def unnamed_params(state: nnx.State) -> list[str]:
    """Paths of parameters with more than one dimension and no logical names (a test guards this)."""
    missing = []
    for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        if isinstance(var, nnx.Variable) and np.ndim(var.get_value()) > 1 and _names_of(var) is None:
            missing.append(jax.tree_util.keystr(path))
    return missing


def param_shardings(state: nnx.State, mesh: Mesh) -> Any:
    """``NamedSharding`` tree matching ``state`` (Variables' values), from their logical names."""

    def one(var):
        if not isinstance(var, nnx.Variable):
            return NamedSharding(mesh, P())
        value = var.get_value()
        names = _names_of(var)
        if names is None:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, logical_to_spec(names, np.shape(value), mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_params(state: nnx.State, mesh: Mesh) -> nnx.State:
    """Places every parameter of ``state`` on ``mesh`` according to its logical names."""
    shardings = param_shardings(state, mesh)
    return jax.tree.map(
        lambda var, s: var.replace(jax.device_put(var.get_value(), s)) if isinstance(var, nnx.Variable) else jax.device_put(var, s),
        state,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def create_sharded(make_module: Callable[[], nnx.Module], mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """Builds ``make_module()``'s parameters directly on ``mesh`` (one jitted initialisation).

    No device ever holds the whole model, and the random values are the same as an eager build's
    (the initialisers draw the same bits under jit), so seeds keep their meaning.
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(make_module))
    init = jax.jit(lambda: nnx.split(make_module())[1], out_shardings=param_shardings(abstract, mesh))
    return graphdef, init()


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a batch-major array: the leading axis over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, P(LOGICAL_AXIS_RULES["batch"], *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_multiple(mesh: Mesh) -> int:
    """The number every global batch size must be a multiple of on ``mesh``."""
    return _mesh_axis_size(mesh, LOGICAL_AXIS_RULES["batch"])


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``x`` constrained to the sharding its logical axis ``names`` map to on the mesh set by
    `on_mesh` (``jax.set_mesh``); unchanged when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


class on_mesh:  # noqa: N801 - used like a function: on_mesh(jax.jit(f, ...), mesh)
    """A jitted function traced (called or lowered) under ``jax.set_mesh(mesh)``, so the model's
    `constrain` calls see the mesh. ``.lower(...)`` works as for the jitted function."""

    def __init__(self, jitted: Callable, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args, **kwargs)
