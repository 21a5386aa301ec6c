"""experiments/accuracy_by_operation.py on the natural suite's own test items."""

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("accuracy_by_operation", REPO / "experiments" / "accuracy_by_operation.py")
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)


def test_the_sum_baseline_is_right_exactly_on_the_addition_only_items(tmp_path, capsys):
    from cream_jax.data import natural

    items = natural.make_suite(natural.NaturalConfig()).test["arith"][:64]
    kinds = [script.operation_kind(it["question"]) for it in items]
    baseline = [script.sum_baseline(it["question"], it["label"]) for it in items]
    assert set(kinds) == {"add-only", "with sub"}  # the default suite has no multiplication
    assert all(b == (k == "add-only") for k, b in zip(kinds, baseline))
    assert kinds.count("add-only") == 35  # docs/natural_suite.md, "What the accuracies measure"

    # A run that answers correctly only the addition-only items: 100% there, 0% with a subtraction.
    records = [{"task": "arith", "question": it["question"], "label": it["label"], "correct": k == "add-only",
                "id": it["id"]} for it, k in zip(items, kinds)]
    (tmp_path / "seed0" / "cream" / "samples").mkdir(parents=True)
    (tmp_path / "seed0" / "cream" / "samples" / "eval_1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert script.main(["--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any("M2" in line and "add-only" in line and " 35  100.0" in line for line in out), out
    assert any("with sub" in line and " 29    0.0" in line for line in out), out
    assert script.main(["--root", str(tmp_path / "nothing")]) == 1


def test_eval_saved_models_rewrites_the_records_of_a_finished_run(smoke_run, tmp_path):
    """A run without per-item records (made before they existed): its saved models are evaluated
    again from the command in its train.log, with the accuracies of its own rows."""
    import shutil
    import subprocess
    import sys

    from tests._cli import SMOKE

    reference, _ = smoke_run
    workdir = tmp_path / "old_run"
    shutil.copytree(reference, workdir)
    for f in (workdir / "samples").glob("eval_*.jsonl"):
        f.unlink()
    (workdir / "train.log").write_text(f"$ {sys.executable} -m cream_jax.train --workdir {workdir} --gin_file {SMOKE}\n")
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "eval_saved_models.py"), str(workdir)],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(" same; wrote ") == 3 and "DIFFERENT" not in proc.stdout  # M1, M2, M3
    rows = json.loads((workdir / "results.json").read_text())["iterations"]
    for row in rows:
        items = [json.loads(line) for line in (workdir / "samples" / f"eval_{row['iteration']}.jsonl").read_text().splitlines()]
        assert sum(r["correct"] for r in items if r["task"] == "arith") == round(row["accuracy"]["arith"] * 8)


def test_eval_saved_models_maps_a_moved_run_config_to_this_checkout():
    spec = importlib.util.spec_from_file_location("eval_saved_models", REPO / "experiments" / "eval_saved_models.py")
    eval_saved_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_saved_models)
    # The run's checkout lived under another folder named configs: its own configs/ is the last one.
    moved = "/elsewhere/configs/old_checkout/configs/models/smollm2_135m_instruct.gin"
    assert eval_saved_models.local_config(moved) == str(REPO / "configs" / "models" / "smollm2_135m_instruct.gin")
    assert eval_saved_models.local_config("/elsewhere/x.gin") == "/elsewhere/x.gin"  # no configs/: left as written
