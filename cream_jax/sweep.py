"""Grid sweeps over gin bindings: ``python -m cream_jax.sweep --gin_file F --sweep 'DPO.beta=[0.05,0.1]'``.

Every ``--sweep`` flag is one axis ``Configurable.param=[v1, v2, ...]`` (values in gin syntax); the
grid is their product. Each point runs ``python -m cream_jax.train`` in its own workdir under
``--root`` (named after its bindings), so a sweep can be resumed: finished points (with a
results.json whose iterations are complete) are skipped. ``--dry_run`` prints the commands.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from cream_jax import errors

_AXIS_RE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=\s*\[(.*)\]\s*$", re.DOTALL)


def parse_axis(text: str) -> tuple[str, list[str]]:
    """``'DPO.beta=[0.05, 0.1]'`` -> ``("DPO.beta", ["0.05", "0.1"])`` (values kept as gin text)."""
    m = _AXIS_RE.match(text)
    if not m:
        raise errors.ConfigError(f"--sweep {text!r}: expected 'Configurable.param=[v1, v2, ...]'")
    name, body = m.group(1), m.group(2)
    values, depth, current, quote = [], 0, "", None
    for ch in body:  # split on top-level commas; tuples, lists and strings may contain commas
        if quote:
            current += ch
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote, current = ch, current + ch
        elif ch in "([{":
            depth, current = depth + 1, current + ch
        elif ch in ")]}":
            depth, current = depth - 1, current + ch
        elif ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        values.append(current.strip())
    if not values:
        raise errors.ConfigError(f"--sweep {text!r}: no values")
    return name, values


def expand(axes: list[str]) -> list[list[str]]:
    """The grid: a list of binding lists, one per run."""
    parsed = [parse_axis(a) for a in axes]
    return [[f"{name} = {value}" for (name, _), value in zip(parsed, combo)]
            for combo in itertools.product(*[values for _, values in parsed])]


def run_name(bindings: list[str]) -> str:
    parts = [re.sub(r"[^\w.+-]+", "", b.replace(" = ", "=")) for b in bindings]
    return "__".join(parts) or "default"


def finished(workdir: Path, iterations_expected: int | None) -> bool:
    path = workdir / "results.json"
    if not path.exists():
        return False
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    done = [r for r in results.get("iterations", []) if r.get("iteration", 0) >= 1]
    n = iterations_expected or results.get("config", {}).get("iterations", 0)
    return len(done) >= n


def check_grid(gin_files: list[str], shared: list[str], grid: list[list[str]]) -> None:
    """Parses and validates every point's config before the first run starts, so a bad value in
    the last point does not surface after hours (errors name the point's bindings)."""
    from cream_jax import config as config_lib, validate  # noqa: PLC0415 - gin and jax only when running

    for bindings in grid:
        try:
            config_lib.parse_gin(gin_files, shared + bindings)
            validate.check_gin_bindings()
            validate.check_config(config_lib.build_run_config())
        except ValueError as e:
            raise errors.ConfigError(f"sweep point {'; '.join(bindings)}: {errors.one_line(e)}") from None


def main(argv: list[str] | None = None) -> int:
    """The sweep CLI; every failure is one ``error: <what>: <why>`` line (cream_jax.errors)."""
    return errors.run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cream_jax.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--gin_param", action="append", default=[], help="binding shared by every run")
    parser.add_argument("--sweep", action="append", default=[], required=True, help="'Configurable.param=[v1, v2]'")
    parser.add_argument("--root", default="runs/sweep", help="parent directory of the runs' workdirs")
    parser.add_argument("--dry_run", action="store_true")
    args = parser.parse_args(argv)
    grid = expand(args.sweep)
    if not args.dry_run:
        check_grid(args.gin_file, args.gin_param, grid)
    failures = 0
    for i, bindings in enumerate(grid):
        workdir = Path(args.root) / run_name(bindings)
        cmd = [sys.executable, "-m", "cream_jax.train", "--workdir", str(workdir)]
        for f in args.gin_file:
            cmd += ["--gin_file", f]
        for b in args.gin_param + bindings:
            cmd += ["--gin_param", b]
        print(f"[{i + 1}/{len(grid)}] {shlex.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        if finished(workdir, None):
            print(f"  already finished: {workdir}", flush=True)
            continue
        rc = subprocess.call(cmd)
        if rc:
            failures += 1
            print(f"  run failed with exit code {rc}: {workdir}", file=sys.stderr, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
