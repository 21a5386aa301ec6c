"""Failure classes of a run and the one exit path of the command-line programs.

Every expected failure is one exception class with its own exit code, and `run_cli` turns it into
exactly one line on stderr, ``error: <what>: <why>``, where <why> names the field or file:

  class          what         exit   raised for
  ConfigError    config       2      a gin binding or config value no run can use
  Divergence     divergence   3      NaN/inf, or loss / gradient norm / parameters blowing up
  DataError      data         4      a data file: missing, not UTF-8, bad schema, bad label or task
  ModelError     model        5      the model folder or tokenizer (config.json, safetensors, vocab)
  CheckpointError checkpoint  6      a checkpoint or model snapshot that cannot be written or read
  FilesystemError filesystem  7      the workdir (not a directory, read-only) or any OSError
  OutOfMemory    memory       8      XLA ran out of device or host memory (RESOURCE_EXHAUSTED)
  Interrupted    interrupted  130    Ctrl-C (SIGINT) or SIGTERM; the last committed checkpoint is kept
  (anything else) internal    1      a bug: one line too; CREAM_JAX_TRACEBACK=1 prints the traceback

The Config, Data and Model errors are ValueErrors (and FilesystemError an OSError), so library
callers that catch the built-in types keep working. This module imports nothing heavy: library
modules raise these classes, and only the CLIs call `run_cli`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

TRACEBACK_ENV = "CREAM_JAX_TRACEBACK"
INTERNAL_EXIT = 1


class CreamError(Exception):
    """Base of the expected failures: ``str(e)`` is the <why> part, naming the field or file."""

    what = "error"
    exit_code = INTERNAL_EXIT


class ConfigError(CreamError, ValueError):
    what, exit_code = "config", 2


class Divergence(CreamError, RuntimeError):
    what, exit_code = "divergence", 3


class DataError(CreamError, ValueError):
    what, exit_code = "data", 4


class ModelError(CreamError, ValueError):
    what, exit_code = "model", 5


class CheckpointError(CreamError, RuntimeError):
    what, exit_code = "checkpoint", 6


class FilesystemError(CreamError, OSError):
    what, exit_code = "filesystem", 7

    def __str__(self) -> str:  # OSError's own __str__ would add "[Errno ...]" to a 1-arg error
        return str(self.args[0]) if self.args else ""


class OutOfMemory(CreamError, RuntimeError):
    what, exit_code = "memory", 8


# XLA's out-of-memory errors (XlaRuntimeError / JaxRuntimeError on TPU, GPU and CPU) carry this status.
_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory")
_OOM_ADVICE = ("size the phases with `python -m cream_jax.plan`, then lower the batch sizes or set "
               "Model.remat_policy = 'full' (docs/errors.md); the last committed checkpoint is kept")


class Interrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM: a BaseException, so no ``except Exception`` in library code swallows it."""

    what = "interrupted"
    exit_code = 130


CLASSES: tuple[type, ...] = (ConfigError, Divergence, DataError, ModelError, CheckpointError, FilesystemError,
                             OutOfMemory, Interrupted)

# Plain ValueErrors raised by older library code name their class in a "<what>: " prefix.
_PREFIXES = {"config": ConfigError, "gin": ConfigError, "--gin_file": ConfigError, "data": DataError,
             "model": ModelError, "checkpoint": CheckpointError}


def one_line(text: str, limit: int = 600) -> str:
    """Collapses whitespace (gin and orbax messages span lines) and caps the length."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def classify(exc: BaseException) -> tuple[int, str]:
    """``(exit code, one-line message)`` of an exception, as `run_cli` prints it."""
    if isinstance(exc, Interrupted):
        return exc.exit_code, f"error: interrupted: {one_line(exc) or 'Ctrl-C'}"
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted.exit_code, ("error: interrupted: Ctrl-C (SIGINT); the last committed checkpoint is kept, "
                                       "rerun the same command to resume")
    if isinstance(exc, CreamError):
        return exc.exit_code, f"error: {exc.what}: {one_line(exc)}"
    if isinstance(exc, ValueError):
        text = one_line(exc)
        head, sep, rest = text.partition(": ")
        cls = _PREFIXES.get(head)
        if sep and cls is not None:
            what = "config" if cls is ConfigError and head != "config" else cls.what
            return cls.exit_code, f"error: {what}: {rest if head == what else text}"
        return ConfigError.exit_code, f"error: config: {text}"
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else ""
        why = exc.strerror or one_line(exc)
        return FilesystemError.exit_code, f"error: filesystem: {where}: {why}" if where else f"error: filesystem: {why}"
    if isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MARKERS):
        return OutOfMemory.exit_code, f"error: {OutOfMemory.what}: {one_line(exc, 300)}; {_OOM_ADVICE}"
    return INTERNAL_EXIT, (f"error: internal: {type(exc).__name__}: {one_line(exc)} "
                           f"(a bug; {TRACEBACK_ENV}=1 prints the traceback)")


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(f"{signal.Signals(signum).name}; the last committed checkpoint is kept, rerun the same command to resume")


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Holds SIGINT and SIGTERM for the duration of the block, then delivers them.

    For the few calls that must not be cut in half: a Ctrl-C landing inside orbax's ``save``
    (between starting a save's background threads and handing them their signals) left those
    non-daemon threads waiting out a 20-minute timeout, so the interpreter could not exit. The
    signal arrives the moment the block ends, to whatever handler was in place before it. Off the
    main thread (where Python delivers no signals) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if received:
            signal.raise_signal(received[0])  # the restored handler runs now (KeyboardInterrupt, Interrupted)


def _release_pending_writes() -> None:
    """Completes (or, if they failed, unblocks) asynchronous checkpoint writes, so the interpreter
    exits instead of waiting on orbax's background threads."""
    if "cream_jax.checkpoint" in sys.modules:  # never import orbax just to exit
        sys.modules["cream_jax.checkpoint"].close_all()


class _NoTracebacks(logging.Filter):
    """Keeps library log records (orbax logs a failed background write with its traceback) to their
    message: the one error line of `run_cli` is what the user reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def run_cli(main_fn: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Runs ``main_fn(argv)``; every failure becomes one stderr line and its class's exit code.

    Pending checkpoint writes are completed or cancelled before returning, on success too. SIGTERM
    is handled like SIGINT (both raise `Interrupted`) while ``main_fn`` runs in the main thread.
    ``SystemExit`` (argparse's ``--help`` and usage errors) passes through unchanged.
    """
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if in_main else None
    quiet = _NoTracebacks()
    if os.environ.get(TRACEBACK_ENV, "") in ("", "0"):
        logging.getLogger("absl").addFilter(quiet)
    try:
        try:
            return int(main_fn(argv) or 0)
        finally:
            _release_pending_writes()
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - this is the one place every failure ends
        code, message = classify(exc)
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            traceback.print_exception(exc, file=sys.stderr)
        # Objects held by the failed frames (progress bars, open files) finish now, not after the line.
        traceback.clear_frames(exc.__traceback__)
        sys.stderr.flush()
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
        return code
    finally:
        logging.getLogger("absl").removeFilter(quiet)
        if in_main:
            signal.signal(signal.SIGTERM, previous)
