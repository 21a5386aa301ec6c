"""Run checkpoints, per-name model snapshots, run identity and a NaN guard.

The trainer runs stages M0 -> M1 -> iterations t = 1..T, each made of phases. A restarted run on
the same workdir must resume at the same stage, iteration, phase and step and end with the same
result as an uninterrupted run. This module gives it the pieces, all built on orbax-checkpoint:

  RunCheckpointer   one checkpoint = composite of ``state`` (a pytree of arrays: params, optax
                    state, RNG key, curated pair arrays, ...), ``progress`` (JSON: stage, iteration,
                    phase, step, ...) and ``extra`` (JSON: e.g. a grain iterator state; ``bytes``
                    round-trip through base64). Atomic: orbax writes ``<step>.orbax-checkpoint-tmp``
                    and renames it to ``<step>`` only when every item is on disk, so a kill leaves
                    at worst a tmp dir, which is never listed as a step and is removed on the next
                    open. A complete-looking latest step that cannot be read is skipped by
                    ``restore()`` and moved aside, so the run resumes from the last good one.
  ModelStore        params pytrees saved/loaded by name ("m0", "m1", "iter_2") so only the policy
                    has to stay resident; M_{t-1} / M0 come back from disk just for scoring.
  run identity      ``operative_config.gin`` + ``run.json`` beside the checkpoints; a restart with a
                    different config is refused.
  is_finite_tree    host-side check so the trainer can stop on NaN and keep the last good checkpoint.

No array shapes are interpreted here: every function takes arbitrary pytrees of arrays. Restoring
with an abstract target (``jax.ShapeDtypeStruct`` leaves with ``.sharding``) places every array with
that sharding, whatever mesh the checkpoint was written from (orbax reads only the needed slices).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import os
import re
import subprocess
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocp_managers

from cream_jax.errors import CheckpointError, deferred_interrupts

PyTree = Any

_log = logging.getLogger(__name__)

# Key that marks a base64-encoded ``bytes`` value inside the JSON items.
_BYTES_TAG = "__bytes_b64__"
# Prefix of a step directory moved aside because it could not be read; orbax only lists names
# that are plain integers, so these are invisible to it.
_CORRUPT_PREFIX = "corrupt_step_"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CORRUPT_MODEL_PREFIX = "corrupt_"
RUN_INFO_FILE = "run.json"
OPERATIVE_CONFIG_FILE = "operative_config.gin"


# ---------------------------------------------------------------------------------------------
# JSON items (progress / extra)
# ---------------------------------------------------------------------------------------------


def _to_json(value: Any, where: str) -> Any:
    """Returns a fresh JSON-compatible copy of ``value`` (bytes -> tagged base64).

    A fresh copy also protects an asynchronous save from the caller mutating its dict afterwards.
    """
    if isinstance(value, bytes):
        return {_BYTES_TAG: base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: key {key!r} is not a string (JSON keys must be str)")
            if key == _BYTES_TAG:
                raise ValueError(f"{where}: key {_BYTES_TAG!r} is reserved for encoded bytes")
            out[key] = _to_json(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_to_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        dtype = value.dtype
        numeric = jax.dtypes.issubdtype(dtype, np.integer) or jax.dtypes.issubdtype(dtype, np.floating)
        if not (numeric or jax.dtypes.issubdtype(dtype, np.bool_)):
            raise ValueError(f"{where}: value of dtype {dtype} is not JSON-serialisable")
        array = np.asarray(value)
        if jax.dtypes.issubdtype(dtype, np.floating):
            array = array.astype(np.float64)  # bfloat16 & co. have no Python conversion of their own
        return array.tolist()  # a Python scalar for 0-d values, nested lists otherwise
    raise ValueError(f"{where}: value of type {type(value).__name__} is not JSON-serialisable")


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_BYTES_TAG}:
            return base64.b64decode(value[_BYTES_TAG])
        return {key: _from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    return value


# ---------------------------------------------------------------------------------------------
# Target checking: a wrong target is the caller's error, never a reason to skip a checkpoint.
# ---------------------------------------------------------------------------------------------


def _path_str(path: tuple) -> str:
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _stored_shape(leaf: Any) -> tuple[int, ...] | None:
    """Shape as stored on disk (typed PRNG keys are stored as their key data)."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, dtype)).shape)
    shape = getattr(leaf, "shape", None)
    return None if shape is None else tuple(shape)


class _TargetMismatchError(ValueError):
    """The caller's target differs from a checkpoint: its error, never a reason to skip a step."""


class _CallerError(Exception):
    """Wraps an exception raised by the caller's target function, to re-raise it unchanged."""


def _check_target(target: PyTree, saved: PyTree, where: str) -> None:
    """Raises ValueError if ``target`` differs from the saved tree in structure or shapes.

    Dtypes may differ (orbax casts, e.g. float32 checkpoint -> bfloat16 params).
    """
    want = {_path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(target)}
    have = {_path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(saved)}
    if set(want) != set(have):
        missing = sorted(set(have) - set(want))[:3]
        unexpected = sorted(set(want) - set(have))[:3]
        raise _TargetMismatchError(
            f"{where}: the target tree does not match the saved one "
            f"(saved leaves missing from the target: {missing}; target leaves not saved: {unexpected})"
        )
    for name, leaf in want.items():
        a, b = _stored_shape(leaf), _stored_shape(have[name])
        if a is not None and b is not None and a != b:
            raise _TargetMismatchError(f"{where}: target leaf {name!r} has shape {a}, the saved one {b}")


def _abstract(tree: PyTree) -> PyTree:
    """Concrete arrays -> ``ShapeDtypeStruct`` keeping their sharding; abstract leaves unchanged."""

    def one(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(one, tree)


def _fallback_sharding() -> jax.sharding.Sharding:
    """Where a restore without a target puts an array whose saved devices are gone (another topology).

    Replicated over the first local device of every process: each process reads the whole array
    onto a device of its own, so ``np.asarray`` of it works in every process, as with one process.
    ``jax.devices()[0]`` belongs to process 0 alone: the others' restore failed with "no
    addressable shards". The whole mesh is not known here, and a copy per device would multiply
    the memory of the whole arrays this restores by the local device count.
    """
    firsts = [jax.local_devices(process_index=p)[0] for p in range(jax.process_count())]
    return jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(firsts), ("process",)), jax.sharding.PartitionSpec())


def _saved_shapes(metadata_tree: PyTree) -> PyTree:
    """Orbax metadata tree -> tree of ``jax.ShapeDtypeStruct`` without sharding."""

    def one(m):
        if hasattr(m, "shape") and hasattr(m, "dtype"):
            return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)
        return m

    return jax.tree.map(one, metadata_tree)


# ---------------------------------------------------------------------------------------------
# Failed asynchronous writes: one line, and no hang at interpreter exit
# ---------------------------------------------------------------------------------------------

# Every open RunCheckpointer / ModelStore, so the CLI's exit path can finish their writes.
_OPEN: weakref.WeakSet = weakref.WeakSet()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def _probe_writable(directory: Path, what: str) -> None:
    """Creates and removes a file in ``directory``: refuses a read-only or full filesystem before
    orbax starts background threads that would fail there."""
    probe = directory / f".write_probe_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"{what}: cannot write to {directory} ({e.strerror or e}); "
                              "make it writable (or free space) and rerun to resume") from None


def _unblock_failed_background_writes() -> None:
    """Wakes orbax's background threads that wait for a step of a save that failed.

    A failed step of an asynchronous save (e.g. creating ``<step>.orbax-checkpoint-tmp`` in a
    read-only directory) never sets the signal that the save's later threads wait for; they are
    non-daemon threads with a 20-minute timeout, so the interpreter would hang at exit. Called only
    after a save failed: every thread still waiting belongs to a save that can no longer succeed.
    """
    try:
        from orbax.checkpoint._src.futures import future as orbax_future  # noqa: PLC0415
    except ImportError:  # another orbax layout: nothing we know how to unblock
        return
    # The abandoned save's coroutines are never awaited; Python would say so at exit, after the error.
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    for thread in threading.enumerate():
        if isinstance(thread, orbax_future._SignalingThread) and thread.is_alive():  # noqa: SLF001
            thread._cancelled = True  # noqa: SLF001 - it returns without running its target once woken
            try:
                orbax_future.set_signals(thread._receive_signals, operation_id=thread._operation_id)  # noqa: SLF001
            except Exception:  # noqa: BLE001, S110 - best effort on an exit path
                pass


def _finish(wait: Callable[[], None], close: Callable[[], None], what: str) -> None:
    """Waits for pending writes, then closes; a failed write is one CheckpointError line."""
    try:
        wait()
    except Exception as e:  # noqa: BLE001 - orbax re-raises the background thread's error
        _unblock_failed_background_writes()
        try:
            close()
        except Exception:  # noqa: BLE001, S110 - the first error is the one to report
            pass
        raise CheckpointError(f"{what}: an asynchronous write failed ({_first_line(e)}); "
                              "the last committed checkpoint is kept") from e
    close()


def close_all() -> None:
    """Completes (or, after a failure, abandons) every open checkpointer's pending writes and
    closes it. The CLI's exit path (`cream_jax.errors.run_cli`) calls it; errors were reported."""
    for owner in list(_OPEN):
        try:
            owner.close()
        except Exception:  # noqa: BLE001, S110 - already failed once; exiting now
            pass


# ---------------------------------------------------------------------------------------------
# RunCheckpointer
# ---------------------------------------------------------------------------------------------


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.StandardSave)
    registry.add("state", ocp.args.StandardRestore)
    for item in ("progress", "extra"):
        registry.add(item, ocp.args.JsonSave)
        registry.add(item, ocp.args.JsonRestore)
    return registry


class RunCheckpointer:
    """Atomic, resumable run checkpoints: ``state`` arrays + ``progress`` JSON + ``extra`` JSON.

    ``step`` is a global save counter chosen by the caller and strictly increasing. Saves are
    asynchronous by default: ``save`` returns once the arrays are copied off the devices and the
    files are written in the background; ``wait()`` blocks until they are committed, and
    ``restore``/``close`` wait first. Use as a context manager or call ``close()``.

    Args:
      directory: where the step directories live (created if needed).
      max_to_keep: number of most recent checkpoints kept.
      keep_period: if set, checkpoints whose step is a multiple of it are kept forever as well.
      async_save: write in a background thread (True) or before ``save`` returns (False).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        keep_period: int | None = None,
        async_save: bool = True,
    ):
        if max_to_keep < 1:
            raise ValueError(f"RunCheckpointer: max_to_keep must be >= 1, got {max_to_keep}")
        if keep_period is not None and keep_period < 1:
            raise ValueError(f"RunCheckpointer: keep_period must be >= 1 or None, got {keep_period}")
        self.directory = Path(directory).absolute()
        policies = [ocp_managers.LatestN(max_to_keep)]
        if keep_period is not None:
            policies.append(ocp_managers.EveryNSteps(keep_period))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
            # A tmp dir left by a killed save is deleted here; orbax never lists it as a step.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options, handler_registry=_registry())
        self.restored_step: int | None = None
        self._closed = False
        _OPEN.add(self)

    # -- saving ---------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: PyTree,
        progress: dict,
        extra: dict | None = None,
        *,
        force: bool = True,
    ) -> bool:
        """Saves one checkpoint (atomically; asynchronously unless ``async_save=False``).

        Args:
          step: global save counter, greater than every step saved before.
          state: pytree of jax/numpy arrays (params, optimizer state, typed or raw RNG keys, ...),
            possibly empty (a progress-only checkpoint; restored as ``{}``). jax arrays keep their
            sharding metadata; numpy leaves come back as numpy.
          progress: JSON-able dict: str keys; values None/bool/int/float/str, lists/tuples (come
            back as lists), dicts, bytes (base64 inside), numpy/jax scalars and numeric arrays
            (come back as Python numbers / nested lists).
          extra: JSON-able dict or None (e.g. a grain iterator state, dict or bytes).
          force: if True a ``step`` not above the latest saved step is an error; if False such a
            save is skipped and False returned.

        Returns:
          Whether a checkpoint was written.
        """
        if not isinstance(progress, dict):
            raise ValueError(f"RunCheckpointer.save: progress must be a dict, got {type(progress).__name__}")
        if extra is not None and not isinstance(extra, dict):
            raise ValueError(f"RunCheckpointer.save: extra must be a dict or None, got {type(extra).__name__}")
        latest = self.latest_step()
        if latest is not None and step <= latest:
            if not force:
                return False
            raise ValueError(f"RunCheckpointer.save: step {step} is not greater than the latest saved step {latest}")
        has_state = bool(jax.tree.leaves(state))
        items = {
            "progress": ocp.args.JsonSave(_to_json(progress, "progress")),
            "extra": ocp.args.JsonSave({"extra": _to_json(extra, "extra"), "has_state": has_state}),
        }
        if has_state:  # orbax refuses an empty tree; a progress-only checkpoint has no state item
            items["state"] = ocp.args.StandardSave(state)
        if jax.process_index() == 0:
            _probe_writable(self.directory, f"checkpoint {step}")
        try:
            with deferred_interrupts():  # a save cut in half leaves orbax threads that block the exit
                return bool(self._mgr.save(step, args=ocp.args.Composite(**items), force=True))
        except OSError as e:
            _unblock_failed_background_writes()
            raise CheckpointError(f"checkpoint {step} in {self.directory}: {_first_line(e)}") from e

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is committed (renamed into place).

        Raises:
          CheckpointError: a pending save failed (its background threads are released).
        """
        try:
            self._mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax re-raises the background thread's error
            _unblock_failed_background_writes()
            raise CheckpointError(f"{self.directory}: an asynchronous checkpoint write failed ({_first_line(e)}); "
                                  "the last committed checkpoint is kept") from e

    def close(self) -> None:
        """Waits for pending saves and closes; idempotent. A failed save still closes, then raises."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        _finish(self._mgr.wait_until_finished, self._mgr.close, f"checkpoints in {self.directory}")

    def __enter__(self) -> RunCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps of the committed checkpoints, ascending."""
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None (tmp dirs of interrupted saves never count)."""
        return self._mgr.latest_step()

    def restore(
        self,
        step: int | None = None,
        abstract_state: PyTree | Callable[[dict, PyTree], PyTree] | None = None,
    ) -> tuple[PyTree, dict, dict | None]:
        """Restores ``(state, progress, extra)``.

        Args:
          step: the step to read; None reads the newest one that can be read, skipping (and moving
            aside to ``corrupt_step_<n>_<time>``) newer ones whose files are damaged.
          abstract_state: None, a target pytree, or a function ``(progress, saved_shapes) ->
            target`` called with the step's progress and its tree of ``ShapeDtypeStruct`` (use it
            when shapes depend on what was saved, e.g. curated pair arrays). Target leaves are
            ``jax.ShapeDtypeStruct`` (with ``.sharding`` to place the array there, resharding as
            needed; without it the saved sharding is reused) or concrete arrays (their shape,
            dtype and sharding are used). None restores the saved structure (namedtuples become
            dicts, tuples lists): jax arrays on their saved sharding (if that topology is gone,
            replicated on the first device of each process), numpy leaves as numpy.

        Returns:
          ``(state, progress, extra)``; ``self.restored_step`` is set to the step read.

        Raises:
          FileNotFoundError: no committed checkpoint exists (or the requested step does not).
          ValueError: the target's tree or shapes differ from the checkpoint's.
        """
        self.wait()
        if step is not None:
            if step not in self._mgr.all_steps():
                raise FileNotFoundError(f"RunCheckpointer.restore: no checkpoint {step} in {self.directory}")
            try:
                out = self._restore_step(step, abstract_state)
            except _CallerError as e:
                raise e.__cause__ from None
            self.restored_step = step
            return out
        steps = sorted(self._mgr.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"RunCheckpointer.restore: no committed checkpoint in {self.directory}")
        failed: list[int] = []
        first_error: Exception | None = None
        for candidate in steps:
            try:
                out = self._restore_step(candidate, abstract_state)
            except _TargetMismatchError:
                raise
            except _CallerError as e:
                raise e.__cause__ from None
            except Exception as e:  # noqa: BLE001 - any read failure means this step is damaged
                _log.warning("checkpoint %d in %s cannot be read (%s); trying an older one", candidate, self.directory, e)
                failed.append(candidate)
                first_error = first_error or e
                continue
            for bad in failed:
                self._quarantine(bad)
            self.restored_step = candidate
            return out
        raise CheckpointError(
            f"RunCheckpointer.restore: none of the checkpoints {steps} in {self.directory} can be read; "
            f"the newest failed with {type(first_error).__name__}: {str(first_error).splitlines()[0][:300]}"
        ) from first_error

    def _restore_step(self, step: int, abstract_state: Any) -> tuple[PyTree, dict, dict | None]:
        json_items = self._mgr.restore(
            step, args=ocp.args.Composite(progress=ocp.args.JsonRestore(), extra=ocp.args.JsonRestore())
        )
        progress = _from_json(json_items.progress)
        extra = _from_json(json_items.extra["extra"])
        saved = {}
        if json_items.extra["has_state"]:
            meta = self._mgr.item_metadata(step)["state"]
            if meta is None:
                raise OSError(f"checkpoint {step}: the state item's metadata cannot be read")
            saved = _saved_shapes(meta.tree)
        target = abstract_state
        if callable(abstract_state):
            try:
                target = abstract_state(progress, saved)
            except Exception as e:  # noqa: BLE001 - the caller's bug, not a damaged checkpoint
                raise _CallerError() from e
        where = f"RunCheckpointer.restore (checkpoint {step} in {self.directory})"
        if not json_items.extra["has_state"]:
            if target is not None and jax.tree.leaves(target):
                raise _TargetMismatchError(f"{where}: the checkpoint has no state arrays, the target has")
            return {}, progress, extra
        if target is None:
            state_args = ocp.args.StandardRestore(fallback_sharding=_fallback_sharding())
        else:
            target = _abstract(target)
            _check_target(target, saved, where)
            state_args = ocp.args.StandardRestore(target)
        state = self._mgr.restore(step, args=ocp.args.Composite(state=state_args)).state
        return state, progress, extra

    def _quarantine(self, step: int) -> None:
        """Moves an unreadable step aside so the caller can save that step number again."""
        if jax.process_index() == 0:
            src = self.directory / str(step)
            dst = self.directory / f"{_CORRUPT_PREFIX}{step}_{time.time_ns()}"
            _log.warning("moving unreadable checkpoint %s to %s", src, dst)
            os.replace(src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"cream_jax_quarantine_{step}")
        self._mgr.reload()


# ---------------------------------------------------------------------------------------------
# ModelStore
# ---------------------------------------------------------------------------------------------


class ModelStore:
    """Named params snapshots ("m0", "m1", "iter_2", ...) under one directory.

    Saving a name that exists replaces it (a resumed run may write the same model again).
    Writes are asynchronous; ``load``/``exists``/``names`` wait for pending writes first.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
        self._closed = False
        _OPEN.add(self)

    def _path(self, name: str) -> Path:
        if not isinstance(name, str) or not _NAME_RE.match(name) or ".orbax-checkpoint-tmp" in name:
            raise ValueError(f"ModelStore: model name {name!r} must match {_NAME_RE.pattern}")
        return self.directory / name

    def save(self, name: str, params: PyTree) -> None:
        """Writes ``params`` (pytree of arrays) under ``name`` atomically (tmp dir + rename)."""
        path = self._path(name)
        self.wait()
        if jax.process_index() == 0:
            _probe_writable(self.directory, f"model snapshot {name!r}")
        try:
            with deferred_interrupts():  # as in RunCheckpointer.save
                self._ckptr.save(path, args=ocp.args.StandardSave(params), force=True)
        except OSError as e:
            _unblock_failed_background_writes()
            raise CheckpointError(f"model snapshot {name!r} in {self.directory}: {_first_line(e)}") from e

    def exists(self, name: str) -> bool:
        path = self._path(name)
        self.wait()
        return path.is_dir() and bool(ocp.step.is_checkpoint_finalized(path))

    def names(self) -> list[str]:
        """Names of the committed models, sorted (snapshots moved aside as damaged excluded)."""
        self.wait()
        return sorted(p.name for p in self.directory.iterdir()
                      if _NAME_RE.match(p.name) and not p.name.startswith(_CORRUPT_MODEL_PREFIX) and self.exists(p.name))

    def load(self, name: str, abstract_params: PyTree | None = None) -> PyTree:
        """Reads the params saved under ``name``.

        Args:
          name: model name.
          abstract_params: target tree of ``jax.ShapeDtypeStruct`` (with ``.sharding`` to place each
            array there) or concrete arrays; None restores the saved structure (jax arrays on their
            saved sharding; if that topology is gone, replicated on the first device of each process).
        """
        if not self.exists(name):
            raise FileNotFoundError(f"ModelStore: no model {name!r} in {self.directory}")
        path = self._path(name)
        try:
            if abstract_params is None:
                args = ocp.args.StandardRestore(fallback_sharding=_fallback_sharding())
            else:
                target = _abstract(abstract_params)
                saved = _saved_shapes(self._ckptr.metadata(path).item_metadata.tree)
                _check_target(target, saved, f"ModelStore.load (model {name!r} in {self.directory})")
                args = ocp.args.StandardRestore(target)
            params = self._ckptr.restore(path, args=args)
            if abstract_params is not None:  # a damaged chunk may read as zeros; shapes were checked above
                jax.block_until_ready(params)
            return params
        except _TargetMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 - any read failure means the snapshot is damaged
            moved = self._quarantine(name)
            raise CheckpointError(
                f"model snapshot {name!r} ({path}) cannot be read ({_first_line(e)}); it was moved to {moved}. "
                "Rerun the same command: a stage whose output is missing is recomputed from the last checkpoint"
            ) from e

    def _quarantine(self, name: str) -> Path:
        """Moves a damaged snapshot aside, so ``exists(name)`` is False and the stage reruns."""
        src = self.directory / name
        dst = self.directory / f"{_CORRUPT_MODEL_PREFIX}{name}_{time.time_ns()}"
        if jax.process_index() == 0:
            _log.warning("moving unreadable model snapshot %s to %s", src, dst)
            os.replace(src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"cream_jax_quarantine_model_{name}")
        return dst

    def wait(self) -> None:
        """Blocks until pending writes are committed; a failed one raises CheckpointError."""
        try:
            self._ckptr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax re-raises the background thread's error
            _unblock_failed_background_writes()
            raise CheckpointError(f"{self.directory}: an asynchronous model snapshot write failed ({_first_line(e)})") from e

    def close(self) -> None:
        """Waits for pending writes and closes; idempotent. A failed write still closes, then raises."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        _finish(self._ckptr.wait_until_finished, self._ckptr.close, f"model snapshots in {self.directory}")


# ---------------------------------------------------------------------------------------------
# Run identity
# ---------------------------------------------------------------------------------------------


def config_fingerprint(text: str) -> str:
    """First 16 hex digits of the sha256 of a config text.

    Trailing whitespace, blank lines and ``#`` comment lines do not change the fingerprint.
    """
    lines = [line.rstrip() for line in text.splitlines()]
    body = "\n".join(line for line in lines if line and not line.lstrip().startswith("#"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]


def git_hash(path: str | os.PathLike | None = None) -> str | None:
    """Commit hash of the repository holding ``path`` (default: this package), ``+dirty`` if
    tracked files have uncommitted changes; None outside a git repository or without git."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not head:
        return None
    return head + ("+dirty" if dirty else "")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_run_info(
    directory: str | os.PathLike, *, config_text: str, config_hash: str, git_hash: str | None,
    config: dict | None = None,
) -> None:
    """Writes ``operative_config.gin`` and ``run.json`` (hash, git hash, versions, times).

    On a resumed run the original creation time is kept and ``last_started`` updated. Only
    process 0 writes.
    """
    if jax.process_index() != 0:
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    info_path = directory / RUN_INFO_FILE
    created = now
    if info_path.exists():
        created = _read_run_info(info_path).get("created", now)
    info = {
        "config_hash": config_hash,
        "git_hash": git_hash,
        "created": created,
        "last_started": now,
        "versions": {"jax": jax.__version__, "orbax-checkpoint": ocp.__version__, "numpy": np.__version__},
    }
    if config is not None:  # the values behind the hash: a refused resume names the fields that differ
        info["config"] = config
    _atomic_write_text(directory / OPERATIVE_CONFIG_FILE, config_text)
    _atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")


def _read_run_info(path: Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read run info ({e})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: run info must be a JSON object")
    return info


def check_run_matches(directory: str | os.PathLike, config_hash: str, config: dict | None = None) -> bool:
    """Refuses to resume a workdir written by another config.

    Args:
      config: the new config as a JSON-plain nested dict (``config.to_json_dict``): the error then names the fields
        that differ from the saved ones (``run.json``, or ``results.json`` of workdirs written before
        run.json kept them).

    Returns:
      False if the workdir has no ``run.json`` (a fresh run), True if it matches.

    Raises:
      ValueError: the workdir was created with a different config hash.
    """
    info_path = Path(directory) / RUN_INFO_FILE
    if not info_path.exists():
        return False
    info = _read_run_info(info_path)
    saved = info.get("config_hash")
    if saved != config_hash:
        changed = ""
        old = info.get("config") or _results_config(Path(directory))
        if config is not None and old is not None:
            diffs = config_differences(old, config)
            if diffs:
                more = f" and {len(diffs) - 5} more" if len(diffs) > 5 else ""
                changed = "; changed: " + ", ".join(diffs[:5]) + more
        raise ValueError(
            f"workdir {directory} was created by a different config (hash {saved} != {config_hash}){changed}; "
            "use a new --workdir or the same config"
        )
    return True


def _results_config(directory: Path) -> dict | None:
    try:
        return json.loads((directory / "results.json").read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``"path: old -> new"`` for every leaf of two nested config dicts that differs (fields only
    one side has, e.g. added in a newer version, read as "(absent)")."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += config_differences(old.get(k, "(absent)"), new.get(k, "(absent)"), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


# ---------------------------------------------------------------------------------------------
# NaN guard
# ---------------------------------------------------------------------------------------------


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    return jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves]).all()


def is_finite_tree(tree: PyTree) -> bool:
    """True if every floating-point leaf of ``tree`` is free of NaN and inf.

    Integer, boolean and PRNG-key leaves are ignored. jax leaves are reduced where they live
    (sharded arrays included) in one jitted program, so one boolean crosses to the host (one
    program, not one per leaf: see `cream_jax.guards.param_norm` for the multi-process reason).
    """
    device_leaves = []
    for leaf in jax.tree.leaves(tree):
        dtype = np.result_type(leaf) if not hasattr(leaf, "dtype") else leaf.dtype
        if not jax.dtypes.issubdtype(dtype, np.inexact):
            continue
        if isinstance(leaf, jax.Array):
            device_leaves.append(leaf)
        elif not np.isfinite(np.asarray(leaf)).all():
            return False
    return not device_leaves or bool(_all_finite(device_leaves))
