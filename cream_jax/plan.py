"""``python -m cream_jax.plan``: per-device memory of every phase program of a config, without weights.

    python -m cream_jax.plan --gin_file configs/llama3_8b.gin --devices 8 --hbm_gb 80

builds the abstract model of the config (``nnx.eval_shape``: shapes only), lays it out on a mesh of
``--devices`` fake CPU devices with the config's ``Mesh`` axes, and for each phase — sample
(generate), score (sequence log-probs), judge (the expected read-out forward) and the DPO train
step — lowers and compiles the very program the loop runs (`cream_jax.engine.programs`,
`cream_jax.steps`) on abstract sharded inputs (``jax.ShapeDtypeStruct`` with shardings). It prints,
per device, what ``compiled.memory_analysis()`` reports: arguments, outputs, temporaries, and
their sum less the donated (aliased) bytes, and whether that fits ``--hbm_gb``.

The sample phase is compiled with scanned decode layers (``layers="scan"``: one ``lax.scan`` over
stacked [L, ...] KV caches) whatever ``Sampling.layers`` says: at 8B the unrolled program does not
compile on XLA:CPU in reasonable time (L copies of the layer per decode segment). It is the same
algorithm with the same parameters, prompt cache and generated-token cache, so the arguments and
outputs are the same; the temporaries are the scanned program's buffer assignment, a little above
the unrolled one's where both compile (8B shapes, 2 and 4 layers: 13.0 vs 10.8 and 15.0 vs 12.9 GB
per device on 8 devices; bench/README.md).

The architecture comes from ``--preset`` (`cream_jax.models.presets`), else from a GGUF source's
header (``*.gguf`` or ``pkg:...``, no tensor read), else from ``Model.source/config.json`` when that folder exists, else from the preset whose hub id ends with
``Model.source``'s folder name (the gin presets' placeholder paths name their checkpoint).

The fake devices: the device count must be fixed before JAX starts its CPU backend, so ``main``
sets ``jax_num_cpu_devices`` first thing; when the backend is already up with fewer devices (e.g.
called from a notebook), it runs itself again in a fresh process. The numbers are the XLA:CPU
compiler's buffer assignment for the partitioned per-device program: TPU and GPU compilers fuse
and schedule differently, so read them as an estimate (arguments are exact).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cream_jax import config as config_lib
from cream_jax import sharding, steps
from cream_jax.engine import programs
from cream_jax.models import gguf, presets
from cream_jax.models.llama import Llama, LlamaConfig

PHASES = ("sample", "score", "judge", "train")
_GB = 1e9


def architecture(cfg: config_lib.RunConfig, preset: str | None = None) -> LlamaConfig:
    """The LlamaConfig of ``cfg.model`` with its compute and parameter dtypes (see module doc)."""
    m = cfg.model
    dtypes = dict(dtype=m.dtype, param_dtype=m.param_dtype)
    if preset is not None:
        if preset not in presets.PRESETS:
            raise ValueError(f"plan: --preset {preset!r} is not one of {', '.join(sorted(presets.PRESETS))}")
        return dataclasses.replace(presets.preset_config(preset), **dtypes)
    if m.source == "embedded":
        raise ValueError("plan: Model.source='embedded' is the tiny CPU model; plan a checkpoint config or pass --preset")
    if m.source.startswith(gguf.PKG_SCHEME) or m.source.endswith(".gguf"):
        return dataclasses.replace(gguf.gguf_config(m.source), **dtypes)
    config_json = os.path.join(m.source, "config.json")
    if os.path.isfile(config_json):
        with open(config_json) as f:
            return LlamaConfig.from_hf(json.load(f), **dtypes)
    name = os.path.basename(os.path.normpath(m.source))
    for key in presets.PRESETS:
        if presets.hub_id(key).split("/")[-1] == name:
            return dataclasses.replace(presets.preset_config(key), **dtypes)
    raise ValueError(f"plan: Model.source={m.source!r} has no config.json and names no preset; pass --preset")


def abstract_params(model_config: LlamaConfig, mesh, remat: Any = False) -> tuple[Any, Any]:
    """(graphdef, params as ``ShapeDtypeStruct`` sharded by their logical names): no weights."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(model_config, rngs=nnx.Rngs(0), remat=remat)))
    shardings = sharding.param_shardings(state, mesh)
    def one(var, s):
        value = var.get_value()
        return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=s))

    return graphdef, jax.tree.map(one, state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _rows(mesh, shape, dtype=jnp.int32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))


def _scalar(mesh, dtype=jnp.float32):
    return jax.ShapeDtypeStruct((), dtype, sharding=sharding.replicated(mesh))


def _rows_for(n: int, mesh) -> int:
    multiple = sharding.batch_multiple(mesh)
    return -(-n // multiple) * multiple


def phase_programs(cfg: config_lib.RunConfig, model_config: LlamaConfig, mesh,
                   sample_layers: str = "scan") -> dict[str, tuple[Any, tuple]]:
    """phase -> (lowerable program, abstract arguments), at the config's batch and sequence sizes;
    the sample phase with ``sample_layers`` decode layers (see the module doc)."""
    s, r = cfg.sampling, cfg.reward
    prompt_len, seq_len = cfg.data.max_prompt_len, cfg.data.max_prompt_len + s.max_new_tokens
    remat = cfg.model.remat_policy if cfg.model.remat else "none"
    graphdef, params = abstract_params(model_config, mesh)
    eos = model_config.eos_ids or (0,)
    b_sample, b_score = _rows_for(s.batch_size, mesh), _rows_for(r.score_batch_size, mesh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    out = {
        "sample": (programs.make_generate_program(
            graphdef, params, mesh, num_samples=s.num_samples, max_new_tokens=s.max_new_tokens,
            greedy=s.temperature == 0, top_k=s.top_k, use_top_p=s.top_p < 1.0, eos_ids=eos, pad_id=0,
            layers=sample_layers),
            (params, _rows(mesh, (b_sample, prompt_len)), _rows(mesh, (b_sample, prompt_len)),
             jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh)),
             _scalar(mesh), _scalar(mesh))),
        "score": (programs.make_score_program(graphdef, params, mesh),
                  (params, *[_rows(mesh, (b_score, seq_len))] * 3)),
        # The judge prompt holds the instruction and the response (rendered into the template).
        "judge": (programs.make_expected_judge_program(graphdef, params, mesh),
                  (params, *[_rows(mesh, (b_score, seq_len))] * 2,
                   jax.ShapeDtypeStruct((6,), jnp.int32, sharding=sharding.replicated(mesh)))),
    }
    optim = cfg.dpo.optim
    optimizer = steps.make_optimizer(optim)
    state = steps.abstract_train_state(params, optimizer)
    step = steps.make_train_step(steps.make_dpo_loss(cfg.dpo.beta, cfg.dpo.loss_type), graphdef, optimizer, mesh,
                                 jax.tree.map(lambda x: x.sharding, state), optim.grad_accum, remat=remat)
    pairs = _rows_for(optim.batch_size, mesh)
    batch = {f"{side}_{k}": _rows(mesh, (pairs, seq_len)) for side in ("chosen", "rejected") for k in ("ids", "mask", "resp")}
    batch.update({k: _rows(mesh, (pairs,), jnp.float32) for k in ("ref_chosen", "ref_rejected", "consistency", "weight")})
    batch["lr"] = _scalar(mesh)
    out["train"] = (step, (state, batch))
    return out


def plan(cfg: config_lib.RunConfig, devices: int, hbm_gb: float | None = None, preset: str | None = None,
         phases: tuple[str, ...] = PHASES, model_config: LlamaConfig | None = None,
         sample_layers: str = "scan") -> list[dict]:
    """Compiles each phase on a mesh of ``devices`` of the current backend; one row per phase.

    ``model_config`` overrides the architecture (e.g. fewer layers); ``sample_layers`` is "scan"
    (the default, see the module doc) or "unroll".

    Rows: phase, argument/output/temp/alias bytes per device, ``peak`` = arguments + outputs +
    temporaries - aliased, ``fits`` (None without ``hbm_gb``) and the compile time in seconds.
    """
    if len(jax.devices()) < devices:
        raise ValueError(f"plan: --devices {devices} but only {len(jax.devices())} devices are available")
    model_config = model_config or architecture(cfg, preset)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=jax.devices()[:devices])
    rows = []
    for phase, (program, args) in phase_programs(cfg, model_config, mesh, sample_layers).items():
        if phase not in phases:
            continue
        start = time.perf_counter()
        mem = program.lower(*args).compile().memory_analysis()
        seconds = time.perf_counter() - start
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes)
        rows.append({"phase": phase, "arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
                     "temp": mem.temp_size_in_bytes, "alias": mem.alias_size_in_bytes, "peak": peak,
                     "fits": None if hbm_gb is None else peak <= hbm_gb * _GB, "compile_s": seconds,
                     "mesh": dict(mesh.shape)})
    return rows


def format_table(rows: list[dict], hbm_gb: float | None) -> str:
    head = f"{'phase':<8}{'args GB':>10}{'out GB':>10}{'temp GB':>10}{'peak GB':>10}  {'fits':<6}{'compile s':>10}"
    lines = [head]
    for r in rows:
        fits = "-" if r["fits"] is None else ("yes" if r["fits"] else "NO")
        lines.append(f"{r['phase']:<8}{r['arguments'] / _GB:>10.2f}{r['outputs'] / _GB:>10.2f}{r['temp'] / _GB:>10.2f}"
                     f"{r['peak'] / _GB:>10.2f}  {fits:<6}{r['compile_s']:>10.1f}")
    if hbm_gb is not None:
        lines.append(f"(per device; HBM {hbm_gb:g} GB; peak = args + out + temp - donated)")
    return "\n".join(lines)


def _backend_started() -> bool:
    from jax._src import xla_bridge  # noqa: PLC0415

    return bool(getattr(xla_bridge, "_backends", None))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cream_jax.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--gin_param", action="append", default=[])
    parser.add_argument("--devices", type=int, required=True, help="fake CPU devices of the mesh")
    parser.add_argument("--hbm_gb", type=float, default=None, help="per-device memory to check against")
    parser.add_argument("--preset", default=None, help="architecture preset (default: from Model.source)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.devices < 1:
        parser.error(f"--devices must be >= 1, got {args.devices}")
    phases = tuple(p for p in args.phases.split(",") if p)
    if set(phases) - set(PHASES):
        parser.error(f"--phases: unknown {sorted(set(phases) - set(PHASES))}; choose from {','.join(PHASES)}")
    if _backend_started() and len(jax.devices()) < args.devices:
        # The CPU device count is fixed when the backend starts: run again in a fresh process.
        flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                         if not f.startswith("--xla_force_host_platform_device_count"))
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
        raise SystemExit(subprocess.call([sys.executable, "-m", "cream_jax.plan", *(argv if argv is not None else sys.argv[1:])],
                                         env=env))
    if not _backend_started():
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.devices)
    config_lib.parse_gin(args.gin_file, args.gin_param)
    cfg = config_lib.build_run_config()
    rows = plan(cfg, args.devices, args.hbm_gb, args.preset, phases)
    print(f"plan: {', '.join(args.gin_file) or 'defaults'} on {args.devices} devices, mesh {rows[0]['mesh']}, "
          f"params {cfg.model.param_dtype}, compute {cfg.model.dtype}, remat "
          f"{cfg.model.remat_policy if cfg.model.remat else 'none'}")
    print(format_table(rows, args.hbm_gb))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
