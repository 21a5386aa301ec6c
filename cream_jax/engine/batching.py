"""The one batching path of every phase: pad -> global array (per-process data) -> run -> unpad.

A phase (sample, score, judge, eval, train) takes its batch as global arrays whose leading axis is
split over the mesh's ("data", "fsdp") axes (`cream_jax.sharding` rules), so each device does
1/(data x fsdp) of the work. A host batch is padded only to the next *bucket* the mesh allows (a
multiple of data x fsdp, optionally the next power-of-two multiple so few shapes compile), never up
to a configured batch size: a 10-item eval on 8 devices runs 16 rows, not 128.

Placement never all-gathers: `to_global` hands each process's rows to
``jax.make_array_from_process_local_data``, so a process only transfers the slices its own devices
hold. Outputs stay sharded until a host step needs them (text decoding, the verifier); `to_host`
gathers them with ``multihost_utils.process_allgather`` and drops the padding rows.

Shape letters: B rows (prompts, sequences, pairs), ... any trailing dimensions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from cream_jax import sharding

PyTree = Any


def bucket_rows(n: int, mesh: Mesh, *, power_of_two: bool = True) -> int:
    """The padded row count for ``n`` rows on ``mesh``: the smallest multiple of data x fsdp that
    is >= n, or with ``power_of_two`` the smallest (data x fsdp) * 2^k >= n (log2 many shapes)."""
    if n < 1:
        raise ValueError(f"bucket_rows: need at least one row, got {n}")
    multiple = sharding.batch_multiple(mesh)
    if not power_of_two:
        return -(-n // multiple) * multiple
    rows = multiple
    while rows < n:
        rows *= 2
    return rows


def pad_rows(tree: PyTree, rows: int) -> PyTree:
    """Host arrays with their leading axis padded to ``rows`` by repeating the last row.

    Repeating a real row keeps every padded row valid input (left-padded prompts still end in a
    real token, masks are not empty); callers drop the padded rows' outputs (`to_host`) or give
    them weight 0 (train steps).
    """

    def one(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] == rows:
            return x
        if x.shape[0] > rows:
            raise ValueError(f"pad_rows: {x.shape[0]} rows do not fit in {rows}")
        return np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], axis=0)], axis=0)

    return jax.tree.map(one, tree)


def to_global(tree: PyTree, mesh: Mesh, *, process_local: bool = False) -> PyTree:
    """Global arrays on ``mesh``, the leading axis split over ("data", "fsdp"); scalars replicated.

    Args:
      tree: host arrays. By default every process holds the same whole batch (what the loop's
        deterministic data pipeline gives) and contributes only the rows its devices hold. With
        ``process_local=True`` each process holds just its own consecutive block of rows, in
        process order (a per-host input pipeline), and the global batch is their concatenation.
      mesh: the ("data", "fsdp", "tensor") mesh.
      process_local: see ``tree``.

    Returns:
      The same tree of ``jax.Array``; no process ever transfers rows its devices do not hold.
    """
    multiple = sharding.batch_multiple(mesh)

    def one(x):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.make_array_from_process_local_data(sharding.replicated(mesh), x, x.shape)
        target = sharding.batch_sharding(mesh, x.ndim)
        global_shape = None if process_local else x.shape
        rows = x.shape[0] * (jax.process_count() if process_local else 1)
        if rows % multiple:
            raise ValueError(f"to_global: {rows} rows are not a multiple of data*fsdp={multiple}; pad_rows first")
        return jax.make_array_from_process_local_data(target, x, global_shape)

    return jax.tree.map(one, tree)


def to_host(tree: PyTree, n: int | None = None) -> PyTree:
    """Numpy copies of (possibly multi-process) global arrays on every process, first ``n`` rows.

    The one host step of a phase (text decoding, the verifier, logging) reads outputs through this.
    """
    if jax.process_count() == 1:
        host = jax.tree.map(np.asarray, tree)
    else:
        host = multihost_utils.process_allgather(tree, tiled=True)
    return host if n is None else jax.tree.map(lambda x: x if np.ndim(x) == 0 else x[:n], host)


def map_batched(fn: Callable[..., PyTree], arrays: Sequence[np.ndarray], mesh: Mesh, batch_size: int, *,
                power_of_two: bool = True, progress: Callable | None = None) -> PyTree:
    """Runs ``fn(*global_arrays)`` over chunks of at most ``batch_size`` rows of host ``arrays``.

    Each chunk is padded to its bucket (`bucket_rows`; ``batch_size`` is first rounded up to a
    multiple of data x fsdp), placed with `to_global`, run, and brought back with `to_host`
    without its padding rows. Returns the outputs concatenated over chunks (host numpy).
    """
    n = int(np.shape(arrays[0])[0])
    if n == 0:
        raise ValueError("map_batched: no rows")
    step = bucket_rows(batch_size, mesh, power_of_two=False)
    outs = []
    starts = range(0, n, step)
    for start in progress(starts) if progress else starts:
        take = min(step, n - start)
        rows = min(bucket_rows(take, mesh, power_of_two=power_of_two), step)
        chunk = to_global(pad_rows([np.asarray(a)[start:start + take] for a in arrays], rows), mesh)
        outs.append(to_host(fn(*chunk), take))
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *outs)
