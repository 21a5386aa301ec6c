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
