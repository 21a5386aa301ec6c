"""The command line of the generalized iterative self-rewarding loop: ``python -m cream_jax.train``.

Parses gin files and bindings into a ``RunConfig`` and runs the stage machine
(``cream_jax.loop.stages``): M0 -> M1 -> iterations t = 1..T, each a rollout of M_t, the
method's rewards, consistency and pairs, training M_t -> M_{t+1} and evaluation. ``Run.method``
names a method of ``cream_jax.methods`` ("cream" | "srlm" | "sera" | "scir" | "dpo_oracle", or
one registered from outside; a gin file can ``import`` the module that registers it). A restarted
run on the same ``--workdir`` resumes where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import jax

from cream_jax import config as config_lib, distributed, errors, validate
from cream_jax.loop.stages import run_loop

log = logging.getLogger("cream_jax")

DEFAULT_WORKDIR = "runs/default"

__all__ = ["main", "run_loop"]


# ------------------------------------------------------------------------------------------
# CLI.


def main(argv: list[str] | None = None) -> int:
    """The CLI; every failure is one ``error: <what>: <why>`` line and its exit code (cream_jax.errors)."""
    return errors.run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cream_jax.train", description=__doc__.splitlines()[0])
    parser.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable); default configs/tiny_cpu.gin")
    parser.add_argument("--gin_param", action="append", default=[], help="gin binding, e.g. 'DPO.beta = 0.05' (repeatable)")
    parser.add_argument("--workdir", default=None, help=f"run directory (checkpoints, logs, results); default {DEFAULT_WORKDIR}")
    parser.add_argument("--coordinator_address", default=None, help="host:port of process 0 (env JAX_COORDINATOR_ADDRESS)")
    parser.add_argument("--num_processes", type=int, default=None, help="processes in the run (env JAX_NUM_PROCESSES)")
    parser.add_argument("--process_id", type=int, default=None, help="this process's id (env JAX_PROCESS_ID)")
    args = parser.parse_args(argv)
    _setup_logging()
    # Reruns and resumes reuse compiled programs (JAX's persistent cache; JAX_COMPILATION_CACHE_DIR overrides).
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(Path.home() / ".cache" / "cream_jax" / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    files = args.gin_file or default_gin_files()
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    config_lib.parse_gin(files, args.gin_param)
    validate.check_gin_bindings()
    cfg = config_lib.build_run_config()
    run_loop(cfg, args.workdir or DEFAULT_WORKDIR)
    return 0


def _setup_logging() -> None:
    """Our own handler: absl (imported by orbax) may already own the root logger."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def default_gin_files() -> list[str]:
    """configs/tiny_cpu.gin from a source checkout; none in a wheel (the defaults are the same run)."""
    candidate = Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.gin"
    return [str(candidate)] if candidate.exists() else []


if __name__ == "__main__":
    sys.exit(main())
