"""The real CLI as the end-to-end tests run it (one CPU device, no progress bars)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "tests" / "configs" / "smoke.gin")


def cli(workdir, *extra, env_extra=None, check=True, gin_file=SMOKE):
    # One CPU device and XLA's default flags: tests/_fast_xla.py's flags move the method pins (two
    # methods' iteration-1 train metrics, by near-ties), which the CLI runs here are compared with.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update({"CREAM_JAX_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}, **(env_extra or {}))
    cmd = [sys.executable, "-m", "cream_jax.train", "--gin_file", gin_file, "--workdir", str(workdir), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


def copy_models(source, workdir, names=("m0", "m1")):
    """Starts ``workdir`` from ``source``'s models, so a run skips those stages."""
    (Path(workdir) / "models").mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(Path(source) / "models" / name, Path(workdir) / "models" / name)
