"""cream_jax.plan: the 8B preset's phase programs compile abstractly (no weights) on 8 fake devices."""

import math
import subprocess
import sys

import jax

import pytest

from cream_jax import config as config_lib
from cream_jax import plan, sharding
from cream_jax.models import presets

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def _cfg(*files, bindings=()):
    config_lib.parse_gin([str(ROOT / f) for f in files], list(bindings))
    try:
        return config_lib.build_run_config()
    finally:
        config_lib.parse_gin()


def test_8b_preset_plans_on_8_devices_from_shapes_alone():
    cfg = _cfg("configs/llama3_8b.gin")  # Model.source is a placeholder path: no weights anywhere
    rows = {r["phase"]: r for r in plan.plan(cfg, devices=8, hbm_gb=80, phases=("score", "train"))}
    n = presets.num_params(presets.preset_config("llama3_8b"))
    master = 4 * n / 8  # float32 master weights, FSDP over 8 devices
    # Scoring holds one copy of the params (plus a few KB of token ids) ...
    assert master <= rows["score"]["arguments"] < 1.001 * master
    # ... the train step params + Adam's two moments, all float32, donated into its outputs.
    assert 3 * master <= rows["train"]["arguments"] < 3.001 * master
    assert rows["train"]["alias"] >= 3 * master
    for r in rows.values():
        assert r["temp"] > 0 and r["peak"] == r["arguments"] + r["outputs"] + r["temp"] - r["alias"]
        assert r["fits"] == (r["peak"] <= 80e9)
    assert rows["score"]["fits"]


def test_sample_phase_plans_with_scanned_layers():
    """The sample row, on a small preset: the 8B sample program alone compiles for minutes on 2
    cores, so the 8B test above leaves it out. The program's arguments are one FSDP-split copy of
    the params and the prompts; its outputs the [B, R, M] tokens and mask, split over the rows."""
    cfg = _cfg(bindings=["Model.source = '/x/SmolLM2-135M-Instruct'", "Mesh.data = 1", "Mesh.fsdp = -1",
                         "Data.max_prompt_len = 32",
                         "Sampling.max_new_tokens = 8", "Sampling.batch_size = 8", "Sampling.num_samples = 2"])
    (row,) = plan.plan(cfg, devices=8, hbm_gb=1, phases=("sample",))
    assert row["phase"] == "sample" and row["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    mesh = sharding.make_mesh(1, 8, 1)
    _, params = plan.abstract_params(plan.architecture(cfg), mesh)
    per_device = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert per_device < 0.13 * 4 * presets.num_params(presets.preset_config("smollm2_135m"))  # ~1/8 (norms replicated)
    prompts = 2 * 8 * 32 * 4 // 8  # ids and mask [8, 32] int32 split over 8 devices
    assert per_device + prompts <= row["arguments"] <= per_device + prompts + 64  # + the key and two scalars
    outputs = 2 * 8 * 2 * 8 * 4 // 8  # tokens and mask [8, 2, 8] int32, split over the rows
    assert outputs <= row["outputs"] <= outputs + 16  # + the output tuple's two pointers
    assert row["temp"] > 0 and row["fits"] == (row["peak"] <= 1e9)


def test_cli_runs_itself_again_for_more_devices_than_the_backend_has():
    # This process has 8 fake devices (conftest): 16 need a fresh backend, so main re-executes.
    out = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices(); from cream_jax import plan; plan.main()",
         "--preset", "smollm2_135m", "--devices", "16", "--hbm_gb", "1", "--phases", "score",
         "--gin_param", "Model.source = '/x/SmolLM2-135M-Instruct'", "--gin_param", "Data.max_prompt_len = 48",
         "--gin_param", "Sampling.max_new_tokens = 16", "--gin_param", "Reward.score_batch_size = 16"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "on 16 devices" in out.stdout and "score" in out.stdout, out.stdout


def test_plan_errors_are_one_line():
    cfg = _cfg()
    with pytest.raises(ValueError, match="^plan: Model.source='embedded' is the tiny CPU model"):
        plan.plan(cfg, devices=1)
    with pytest.raises(ValueError, match="^plan: --preset 'llama9' is not one of"):
        plan.plan(cfg, devices=1, preset="llama9")
    with pytest.raises(ValueError, match="^plan: --devices 64 but only 8 devices are available"):
        plan.plan(cfg, devices=64)
