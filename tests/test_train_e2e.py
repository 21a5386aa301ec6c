"""End to end: the real CLI on a minute-scale config, kill-and-resume, every method, bad input.

The uninterrupted smoke run is shared with tests/test_method_pins.py (the session fixture
``smoke_run`` of conftest.py); tests that need only an iteration start from its M0/M1.
"""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests._cli import cli, copy_models

pytestmark = pytest.mark.slow


def load_params(workdir, name):
    from cream_jax import checkpoint

    store = checkpoint.ModelStore(Path(workdir) / "models")
    return store.load(name)


def comparable(results):
    """results.json without wall-clock fields."""
    out = json.loads(json.dumps(results))
    for row in out["iterations"]:
        row.pop("seconds", None)
        row.pop("compiles", None)
    return out


def test_cli_writes_every_output(smoke_run):
    workdir, proc = smoke_run
    results = json.loads((workdir / "results.json").read_text())
    assert results["config"]["method"] == "cream"
    rows = results["iterations"]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert rows[2]["compiles"] == 0  # iterations after the first reuse every compiled program
    it = rows[1]
    assert set(it["accuracy"]) == {"arith", "choice"}
    assert all(0.0 <= v <= 1.0 for v in it["accuracy"].values())
    assert 0.0 <= it["consistency"]["mean"] <= 1.0 and it["consistency"]["std"] >= 0.0
    assert it["pairs_kept"] > 0
    assert {"sample", "score", "train", "eval"} <= set(it["seconds"])
    # Skipped and truncated rows are counted per source (the embedded suite has neither).
    inputs = rows[0]["inputs"]
    assert inputs["sft"] == {"rows": 64, "skipped": 0, "truncated": 0}
    assert inputs["prompts"]["1"] == {"skipped": 0, "rows": 16, "unused": 0, "truncated": 0}
    assert inputs["eval_tasks"] == {"arith": {"rows": 8, "truncated": 0}, "choice": {"rows": 8, "truncated": 0}}
    assert it["prompts_truncated"] == 0
    # Smoke.gin samples <= 16 new tokens and evaluates greedily with <= 16.
    assert all(0 < r["response_tokens"]["eval"] <= 16 for r in rows)
    assert all(0 < r["response_tokens"][k] <= 16 for r in rows[1:] for k in ("rollout", "chosen", "rejected"))
    with open(workdir / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and "consistency/mean" in table[0]
    assert (workdir / "results.png").stat().st_size > 1000
    assert "Run.method" in (workdir / "operative_config.gin").read_text()
    assert "config_hash" in json.loads((workdir / "run.json").read_text())
    assert list((workdir / "logs").glob("events.out.tfevents.*"))
    assert (workdir / "samples" / "iter_1.jsonl").exists()
    # Every evaluated item, per model: its records reproduce the row's accuracy.
    for row in rows:
        items = [json.loads(line) for line in (workdir / "samples" / f"eval_{row['iteration']}.jsonl").read_text().splitlines()]
        assert len(items) == 16 and {"id", "task", "question", "response", "prediction", "label", "correct"} <= set(items[0])
        assert all(isinstance(r["question"], str) and r["question"] for r in items)
        for task, accuracy in row["accuracy"].items():
            assert np.mean([r["correct"] for r in items if r["task"] == task]) == pytest.approx(accuracy)
    assert "consistency" in proc.stdout and "M2" in proc.stdout  # the final table


def test_kill_during_iteration_then_resume_equals_uninterrupted(smoke_run, tmp_path):
    reference, _ = smoke_run
    workdir = tmp_path / "run"
    killed = cli(workdir, env_extra={"CREAM_JAX_KILL_AT": "iteration:1:train:1"}, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (workdir / "models" / "m2").exists()
    # What the killed run logged after its checkpoint (here: a step it never reached) is replayed, not kept.
    from cream_jax.loop.trainer import global_step

    after = global_step({"stage": "iteration", "iteration": 1}, 3)
    with open(workdir / "logs" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": after, "wall_time": 0.0, "iter1/train/loss": 123.0}) + "\n")
    resumed = cli(workdir)
    assert "stage M0" not in resumed.stderr and "stage M1" not in resumed.stderr
    assert "resuming from checkpoint" in resumed.stderr
    ref = json.loads((reference / "results.json").read_text())
    got = json.loads((workdir / "results.json").read_text())
    assert comparable(got) == comparable(ref)
    a, b = load_params(reference, "m3"), load_params(workdir, "m3")
    import jax

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)
    # The steps replayed after the checkpoint are logged once (the interrupted run's lines are purged).
    lines = [json.loads(line) for line in (workdir / "logs" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in lines if any(k.startswith("iter1/train/") for k in r)]
    assert train_steps and len(train_steps) == len(set(train_steps)), train_steps
    assert not any(r.get("iter1/train/loss") == 123.0 for r in lines)


def test_a_finished_iteration_without_its_model_runs_again(smoke_run, tmp_path):
    """M3 missing (a run killed before its write committed, or a damaged snapshot moved aside):
    iteration 2 is recomputed from M2 with the same keys, and gives the same M3 and rows."""
    reference, _ = smoke_run
    workdir = tmp_path / "copy"
    shutil.copytree(reference, workdir)
    shutil.rmtree(workdir / "models" / "m3")
    again = cli(workdir)
    assert "M3, the output of iteration 2, is not in" in again.stderr and "stage M1" not in again.stderr
    assert comparable(json.loads((workdir / "results.json").read_text())) == comparable(
        json.loads((reference / "results.json").read_text()))
    import jax

    for x, y in zip(jax.tree.leaves(load_params(reference, "m3")), jax.tree.leaves(load_params(workdir, "m3"))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)


def test_finished_workdir_reruns_nothing_and_other_config_is_refused(smoke_run, tmp_path):
    reference, _ = smoke_run
    workdir = tmp_path / "copy"
    shutil.copytree(reference, workdir)
    again = cli(workdir)
    assert comparable(json.loads((workdir / "results.json").read_text())) == comparable(
        json.loads((reference / "results.json").read_text()))
    assert "stage M0" not in again.stderr and "stage M1" not in again.stderr
    other = cli(workdir, "--gin_param", "DPO.beta = 0.5", check=False)
    assert other.returncode == 2
    line = other.stderr.strip().splitlines()[-1]
    assert line.startswith("error: config: workdir") and "different config" in line
    assert "changed: dpo.beta: 0.1 -> 0.5;" in line, line  # the field, not only two hashes
    # A workdir whose run.json predates the saved config: the values come from results.json.
    info = json.loads((workdir / "run.json").read_text())
    del info["config"]
    (workdir / "run.json").write_text(json.dumps(info))
    other = cli(workdir, "--gin_param", "DPO.beta = 0.5", "--gin_param", "Eval.batch_size = 4", check=False)
    line = other.stderr.strip().splitlines()[-1]
    assert other.returncode == 2 and "changed: dpo.beta: 0.1 -> 0.5, eval.batch_size: 8 -> 4;" in line, line


@pytest.mark.parametrize(
    "binding, message, code",
    [
        ("Run.method = 'nope'", "Run.method: 'nope' must be one of", 2),
        ("Data.sft_path = '/nonexistent/sft.json'", "/nonexistent/sft.json", 4),
        ("Suite.pool_per_iteration = 0", "prompt pool of iteration 1 is empty", 4),
        ("Data.on_overflow = 'error'", "Data.max_prompt_len", 4),
        ("Model.max_position_embeddings = 64", "exceed the model's context of 64", 2),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, binding, message, code):
    extra = ["--gin_param", binding]
    if "on_overflow" in binding:
        extra += ["--gin_param", "Data.max_prompt_len = 8"]
    if "sft_path" in binding:
        extra += ["--gin_param", "Data.prompt_paths = ('/nonexistent/p1.json', '/nonexistent/p2.json')"]
    proc = cli(tmp_path / "run", *extra, check=False)
    assert proc.returncode == code, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(smoke_run, tmp_path):
    reference, _ = smoke_run
    workdir = tmp_path / "nan"
    copy_models(reference, workdir)
    proc = cli(workdir, "--gin_param", "DPOOptim.learning_rate = 1e39",
               "--gin_param", "Guard.allow = ('DPOOptim.learning_rate',)", check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "non-finite" in proc.stderr or "NaN" in proc.stderr
    assert not (workdir / "models" / "m2").exists()
    assert (workdir / "models" / "m1").exists()
    from cream_jax import checkpoint

    state, progress, _ = checkpoint.RunCheckpointer(workdir / "checkpoints").restore()
    assert progress["stage"] == "iteration" and progress["iteration"] == 1
    assert checkpoint.is_finite_tree(state)


def test_memory_option_bf16_and_hf_export(smoke_run, tmp_path):
    """M_{t-1}/M0 brought in from disk for scoring, bfloat16 params, and an HF export per iteration."""
    reference, _ = smoke_run
    workdir = tmp_path / "lowmem"
    proc = cli(workdir, "--gin_param", "Run.keep_models_resident = False", "--gin_param", "Model.dtype = 'bfloat16'", "--gin_param", "Model.export_dtype = 'bfloat16'",
               "--gin_param", "Run.export_hf = True", "--gin_param", "Pretrain.steps = 2",
               "--gin_param", "Run.iterations = 1")
    results = json.loads((workdir / "results.json").read_text())
    assert [r["iteration"] for r in results["iterations"]] == [0, 1]
    import transformers

    hf_dir = workdir / "hf" / "M2"
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir)
    assert str(model.dtype) == "torch.bfloat16"
    assert "M2" in proc.stdout
