"""experiments/compare_methods.py: paired per-seed differences and their t interval, by hand."""

import importlib.util
import json
import math
from pathlib import Path

from scipy import stats

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_methods", REPO / "experiments" / "compare_methods.py")
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)


def _run(root: Path, seed: int, name: str, accuracies: list[tuple[float, float]]) -> None:
    run = root / f"seed{seed}" / name
    run.mkdir(parents=True)
    rows = [{"iteration": t, "accuracy": {"arith": a, "choice": c}} for t, (a, c) in enumerate(accuracies)]
    (run / "results.json").write_text(json.dumps({"config": {}, "iterations": rows}))


def test_paired_differences_by_hand(tmp_path, capsys):
    # A beats B at M2 by 18, 20, 22 points (mean over the two tasks); at M3 only seed 0 has both.
    for seed, gap in enumerate((0.18, 0.2, 0.22)):
        _run(tmp_path, seed, "a", [(0.5, 0.5), (0.5 + gap, 0.5 + gap)] + ([(0.9, 0.1)] if seed == 0 else []))
        _run(tmp_path, seed, "b", [(0.5, 0.5), (0.5, 0.5), (0.2, 0.2)])
    (tmp_path / "seed3" / "b").mkdir(parents=True)  # a run without results yet: skipped
    rows = {r["model"]: r for r in script.compare(tmp_path, "a", "b")}
    assert set(rows) == {"M1", "M2", "M3"}
    m2 = rows["M2"]
    assert [round(d, 6) for d in m2["diffs"].values()] == [18.0, 20.0, 22.0]
    half = stats.t.ppf(0.975, 2) * 2.0 / math.sqrt(3)  # sample std of (18, 20, 22) is 2
    assert math.isclose(m2["mean"], 20.0) and math.isclose(m2["half"], half) and m2["resolved"]
    assert rows["M3"]["half"] is None and math.isclose(rows["M3"]["mean"], 30.0)
    assert script.main(["--root", str(tmp_path), "a", "b"]) == 0
    out = capsys.readouterr().out
    assert f"mean +20.0 ± {half:.1f}, 95% t interval [{20 - half:+.1f}, {20 + half:+.1f}] (excludes 0)" in out
    assert "M3   seed0 +30.0; one seed, no interval" in out
    # Reversed, the interval lies below 0 (resolved too); the shared M1 differs by exactly 0 (not).
    rows = {r["model"]: r for r in script.compare(tmp_path, "b", "a")}
    assert rows["M2"]["resolved"] and math.isclose(rows["M2"]["mean"], -20.0)
    assert rows["M1"]["mean"] == 0.0 and not rows["M1"]["resolved"]
    assert script.main(["--root", str(tmp_path), "a", "missing"]) == 2


def test_b_under_another_root(tmp_path, capsys):
    # A post-hoc variant in its own root, paired by seed name with the main root's runs.
    main_root, other = tmp_path / "main", tmp_path / "posthoc"
    for seed, gap in enumerate((0.1, 0.2, 0.3)):
        _run(main_root, seed, "sera", [(0.5, 0.5), (0.5 + gap, 0.5 + gap)])
        _run(other, seed, "sera", [(0.5, 0.5), (0.5, 0.5)])
    rows = {r["model"]: r for r in script.compare(main_root, "sera", "sera", other)}
    assert [round(d, 6) for d in rows["M2"]["diffs"].values()] == [10.0, 20.0, 30.0]
    assert not script.compare(main_root, "sera", "sera", tmp_path / "empty")
    assert script.main(["--root", str(main_root), "--root_b", str(tmp_path / "empty"), "sera", "sera"]) == 2
    assert "no seed under" in capsys.readouterr().err
