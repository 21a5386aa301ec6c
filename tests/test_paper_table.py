"""experiments/paper_table.py: scheduling (bases first, failures isolated, resume) and aggregation."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("paper_table", REPO / "experiments" / "paper_table.py")
paper_table = importlib.util.module_from_spec(_spec)
sys.modules["paper_table"] = paper_table  # dataclasses look their module up there
_spec.loader.exec_module(paper_table)


def _row(t, arith, choice, cons=None, pairs=None, reward=None):
    return {"iteration": t, "model": f"M{t + 1}", "accuracy": {"arith": arith, "choice": choice},
            "reward_accuracy": reward, "consistency": None if cons is None else {"mean": cons, "std": 0.1},
            "pairs_kept": pairs, "seconds": {"total": 1.0}}


def _fake_cmd(workdir: Path, rows: list | None, exit_code: int = 0) -> list[str]:
    """A stand-in for the trainer: writes results.json (and models/m0, m1 like a base run) or fails."""
    code = (
        "import json, pathlib, sys; w = pathlib.Path(sys.argv[1]); "
        "[(w / 'models' / m).mkdir(parents=True, exist_ok=True) for m in ('m0', 'm1')]; "
        "rows = json.loads(sys.argv[2]); "
        "config = {'dpo': {'beta': 0.1, 'epochs': 1, 'optim': {'learning_rate': 2e-5}}, 'eval': {'num_per_task': 64}}; "
        "rows is None or (w / 'results.json').write_text(json.dumps({'config': config, 'iterations': rows})); "
        "sys.exit(int(sys.argv[3]))"
    )
    return [sys.executable, "-c", code, str(workdir), json.dumps(rows), str(exit_code)]


def test_mean_ci_is_the_student_t_interval():
    x = [0.2, 0.35, 0.3]
    mean, half = paper_table.mean_ci(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert mean == pytest.approx(np.mean(x))
    assert half == pytest.approx((hi - lo) / 2)
    assert paper_table.mean_ci([0.4]) == (0.4, None)
    assert paper_table.mean_ci([None, 0.5, None])[0] == 0.5


def test_jobs_use_the_method_configs_and_share_m0_m1(tmp_path):
    jobs = paper_table.make_jobs([0, 1], 3, tmp_path, ["Eval.num_per_task = 8"])
    assert len(jobs) == 2 * len(paper_table.TOY_TABLE_METHODS)
    assert set(paper_table.TOY_TABLE_METHODS) < set(paper_table.METHOD_CONFIGS)
    by = {(j.method, j.seed): j for j in jobs}
    avg = by["CREAM (avg)", 1]
    assert str(REPO / "configs" / "cream.gin") in avg.cmd and "CREAM.consistency_level = 'avg'" in avg.cmd
    assert "Run.seed = 1" in avg.cmd and "Run.iterations = 3" in avg.cmd and "Eval.num_per_task = 8" in avg.cmd
    assert avg.copy_from == by[paper_table.BASE, 1].workdir and avg.copy_models == ("m0", "m1")
    assert by["SRLM", 0].copy_models == ("m0",)  # SRLM's M1 is SFT on IFT + EFT: its own
    assert by["SCIR", 0].copy_models == ("m0",)  # SCIR's M1 also learns the pairwise judge: its own
    for (method, _), job in by.items():
        files = [job.cmd[i + 1] for i, a in enumerate(job.cmd) if a == "--gin_file"]
        assert files[0].endswith("configs/tiny_cpu.gin") and all(Path(f).exists() for f in files), method


def test_scheduler_runs_bases_first_isolates_failures_and_resumes(tmp_path):
    jobs = paper_table.make_jobs([0, 1], 1, tmp_path, [])
    for job in jobs:
        fail = job.seed == 1 and job.method == paper_table.BASE
        rows = None if fail else [_row(0, 0.1, 0.3), _row(1, 0.2 + 0.1 * job.seed, 0.4, cons=0.6, pairs=10, reward=0.5)]
        job.cmd = _fake_cmd(job.workdir, rows, exit_code=3 if fail else 0)
    failures = paper_table.run_all(jobs, 1, parallel=2)
    # seed 1's base failed: its method runs never started; seed 0 finished and got M0/M1 copies
    assert any("CREAM (dyn) seed 1: exit 3" in f for f in failures)
    assert not (tmp_path / "seed1" / "sera").exists()
    assert (tmp_path / "seed0" / "sera" / "models" / "m1").is_dir()
    assert all((j.workdir / "results.json").exists() for j in jobs if j.seed == 0)
    # a second invocation skips what finished and retries the rest
    for job in jobs:
        if job.seed == 1 and job.method == paper_table.BASE:
            job.cmd = _fake_cmd(job.workdir, [_row(0, 0.1, 0.3), _row(1, 0.3, 0.5, cons=0.7, pairs=12, reward=0.5)])
    assert paper_table.run_all(jobs, 1, parallel=2) == []

    summary = paper_table.summarize(paper_table.collect(jobs))
    sft = [s for s in summary if s["method"] == "SFT"]
    assert len(sft) == 1 and sft[0]["seeds"] == [0, 1]  # only the base runs' M1 rows
    sera = next(s for s in summary if s["method"] == "SeRA" and s["iteration"] == 1)
    assert sera["accuracy"]["arith"][0] == pytest.approx(0.25)  # seeds 0 and 1: 0.2 and 0.3
    assert sera["accuracy"]["mean"][0] == pytest.approx(np.mean([(0.2 + 0.4) / 2, (0.3 + 0.4) / 2]))
    assert any(s["method"].startswith("SRLM (M1") for s in summary)
    table = paper_table.markdown(summary)
    assert "| SeRA | M2 | 25.0 ± " in table
    paper_table.plot(summary, tmp_path / "acc.png")
    assert (tmp_path / "acc.png").stat().st_size > 0


def test_one_method_with_a_shared_m1_on_another_preset(tmp_path):
    """Issue 13's stage A: only Oracle DPO, on the real-model preset, every seed from seed 0's M1."""
    preset = "configs/models/smollm2_135m_instruct.gin"
    jobs = paper_table.make_jobs([0, 1, 2], 2, tmp_path, [], base_gin=preset, methods=["Oracle DPO"], share_m1=True)
    assert [(j.method, j.seed, j.is_base) for j in jobs] == [("Oracle DPO", s, True) for s in (0, 1, 2)]
    first, *rest = jobs
    assert first.copy_from is None and "Eval.m0 = False" not in first.cmd
    for job in rest:  # M0 is evaluated once; M0/M1 come from seed 0's run
        assert job.copy_from == first.workdir and job.copy_models == ("m0", "m1")
        assert "Eval.m0 = False" in job.cmd
    assert all(job.cmd[job.cmd.index("--gin_file") + 1] == str(REPO / preset) for job in jobs)
    with pytest.raises(ValueError, match="unknown"):
        paper_table.make_jobs([0], 1, tmp_path, [], methods=["Nope"])

    lifts = {0: 0.10, 1: 0.02, 2: 0.06}
    for job in jobs:
        m0 = [{**_row(-1, 0.1, 0.1), "model": "M0"}] if job.seed == 0 else []
        # seed 2's rows carry no response lengths (a run from before they were recorded)
        lengths = {} if job.seed == 2 else {"response_tokens": {"eval": 30.0 + job.seed, "chosen": 50.0, "rejected": 40.0 + job.seed}}
        job.cmd = _fake_cmd(job.workdir, m0 + [_row(0, 0.2, 0.4), _row(1, 0.2, 0.4),
                                               {**_row(2, 0.2 + 2 * lifts[job.seed], 0.4), **lengths}])
    assert paper_table.run_all(jobs, 2, parallel=2) == []
    assert all((j.workdir / "models" / "m1").is_dir() for j in jobs)
    summary = paper_table.summarize(paper_table.collect(jobs))
    by = {(s["method"], s["iteration"]): s for s in summary}
    assert by["M0", -1]["seeds"] == [0] and by["SFT", 0]["seeds"] == [0, 1, 2]
    assert by["Oracle DPO", 1]["lift_vs_sft"][0] == pytest.approx(0.0)
    mean, half = by["Oracle DPO", 2]["lift_vs_sft"]  # (acc_arith + acc_choice) / 2 rises by lift per seed
    x = list(lifts.values())
    assert mean == pytest.approx(np.mean(x))
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * stats.sem(x))
    assert by["Oracle DPO", 2]["response_tokens"] == {"eval": 30.5, "chosen": 50.0, "rejected": 40.5}
    assert by["Oracle DPO", 1]["response_tokens"] == {"eval": None, "chosen": None, "rejected": None}
    table = paper_table.markdown(summary)
    assert "| Oracle DPO | M3 |" in table and "| 30.5 | 50.0 / 40.5 | 3 |" in table
    paper_table.plot(summary, tmp_path / "acc.png")


def test_response_lengths_count_the_logged_texts_per_kind(tmp_path):
    spec = importlib.util.spec_from_file_location("response_lengths", REPO / "experiments" / "response_lengths.py")
    lengths = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lengths)

    class WordTokenizer:  # one token per whitespace-separated word
        def encode(self, text, add_special_tokens=False):
            assert add_special_tokens is False
            return text.split()

    samples = tmp_path / "samples"
    samples.mkdir()
    rows = [{"prompt": "p", "responses": ["a b c", "a", "a b", "a b c d e"], "rewards": [1, 0, 0, 0],
             "chosen": 0, "rejected": 3, "kept": True},
            {"prompt": "q", "responses": ["x", "x y"], "rewards": [0, 0], "chosen": None, "rejected": None,
             "kept": False},
            {"eval": {"question": "?", "answer": "one two"}}]
    (samples / "iter_1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (samples / "iter_0.jsonl").write_text(json.dumps({"eval": {"question": "?", "answer": "w"}}) + "\n")
    got = lengths.run_lengths(WordTokenizer(), tmp_path)
    assert got[1] == {"sampled": [3, 1, 2, 5, 1, 2], "chosen": [3], "rejected": [5], "eval": [2]}
    assert got[0] == {"sampled": [], "chosen": [], "rejected": [], "eval": [1]}


def test_aggregate_records_the_runs_settings_and_keeps_the_bindings(tmp_path):
    """The summary's settings are read back from each run's results.json; --aggregate_only keeps the
    bindings of the invocation that ran the runs (it once wrote [] over them)."""
    root, out = tmp_path / "runs", tmp_path / "out"
    argv = ["--methods", "Oracle DPO", "--seeds", "0,1", "--iterations", "1", "--share_m1", "--root", str(root),
            "--out", str(out)]
    jobs = paper_table.make_jobs([0, 1], 1, root, [], methods=["Oracle DPO"], share_m1=True)
    for job in jobs:
        m0 = [{**_row(-1, 0.1, 0.1), "model": "M0"}] if job.seed == 0 else []
        subprocess_rc = paper_table.subprocess.call(_fake_cmd(job.workdir, m0 + [_row(0, 0.2, 0.4), _row(1, 0.3, 0.4)]))
        assert subprocess_rc == 0
    (out).mkdir()
    (out / "summary.json").write_text(json.dumps({"meta": {"wall_seconds": 12.0, "extra_bindings": ["DPOOptim.learning_rate = 2e-5"]}}))
    assert paper_table.main([*argv, "--aggregate_only"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["extra_bindings"] == ["DPOOptim.learning_rate = 2e-5"] and summary["meta"]["wall_seconds"] == 12.0
    row = next(r for r in summary["rows"] if r["method"] == "Oracle DPO")
    assert row["settings"]["dpo_learning_rate"] == 2e-5 and row["settings"]["eval_num_per_task"] == 64
    # Another aggregate-only pass keeps the per-method bindings the runs were made with, too.
    summary["meta"]["methods"]["Oracle DPO"]["bindings"] = ["DPO.beta = 0.05"]
    (out / "summary.json").write_text(json.dumps(summary))
    assert paper_table.main([*argv, "--aggregate_only"]) == 0
    assert json.loads((out / "summary.json").read_text())["meta"]["methods"]["Oracle DPO"]["bindings"] == ["DPO.beta = 0.05"]
    # ... and how the runs' M0/M1 were shared, when the pass itself is run without --share_m1.
    assert paper_table.main([a for a in argv if a != "--share_m1"] + ["--aggregate_only"]) == 0
    assert json.loads((out / "summary.json").read_text())["meta"]["share_m1"] is True

    # A seed run with other settings is not a replicate: aggregation refuses to pool it.
    path = jobs[1].workdir / "results.json"
    results = json.loads(path.read_text())
    results["config"]["dpo"]["optim"]["learning_rate"] = 1e-6
    path.write_text(json.dumps(results))
    with pytest.raises(ValueError, match="different settings"):
        paper_table.summarize(paper_table.collect(jobs))
    assert paper_table.main([*argv, "--aggregate_only"]) == 1  # one line on stderr, exit 1


def test_method_params_reach_only_their_method():
    per_method = paper_table.method_bindings(["SRLM: SFT.max_len = 448", "SRLM:SRLM.judge_samples = 2"], ["CREAM (dyn)", "SRLM"])
    assert per_method == {"SRLM": ["SFT.max_len = 448", "SRLM.judge_samples = 2"]}
    jobs = paper_table.make_jobs([0], 2, Path("/tmp/x"), [], methods=["CREAM (dyn)", "SRLM"], per_method=per_method)
    by = {j.method: j.cmd for j in jobs}
    assert "SFT.max_len = 448" in by["SRLM"] and "SFT.max_len = 448" not in by["CREAM (dyn)"]
    assert paper_table.method_bindings(["SCIR: SFT.max_len = 288"], ["CREAM (dyn)"]) == {}  # known, not run
    for bad in ["SFT.max_len = 448", "Nope: SFT.max_len = 448", "SRLM:", "SRLM: SFT.max_len"]:
        with pytest.raises(ValueError, match="--method_param"):
            paper_table.method_bindings([bad], ["CREAM (dyn)", "SRLM"])
    # CREAM (avg) copies the base run's M1: an SFT binding would not reach any SFT.
    with pytest.raises(ValueError, match="copy the base run's M0 and M1"):
        paper_table.method_bindings(["CREAM (avg): SFTOptim.learning_rate = 1e-5"], ["CREAM (dyn)", "CREAM (avg)"])
    # SRLM trains its own M1 but copies M0: pre-training bindings would not reach it.
    with pytest.raises(ValueError, match="copy the base run's M0, so a pre-training"):
        paper_table.method_bindings(["SRLM: Pretrain.steps = 50"], ["CREAM (dyn)", "SRLM"])
    # The base run trains the M0 and M1 of all: its pre-training/SFT settings are everyone's (--gin_param).
    with pytest.raises(ValueError, match="Oracle DPO is the base run.*--gin_param"):
        paper_table.method_bindings(["Oracle DPO: SFT.epochs = 2"], ["Oracle DPO"])
    with pytest.raises(ValueError, match="listed twice: SRLM"):
        paper_table.make_jobs([0], 1, Path("/tmp/x"), [], methods=["CREAM (dyn)", "SRLM", "SRLM"])


def test_a_failed_model_copy_fails_its_run_and_skips_its_dependants(tmp_path):
    """A base run counted as finished whose models were deleted: the runs copying from it fail one
    by one (logged), the scheduler goes on and reports them; it does not crash."""
    jobs = paper_table.make_jobs([0, 1], 1, tmp_path, [], methods=["CREAM (dyn)", "SeRA"], share_m1=True)
    by = {(j.method, j.seed): j for j in jobs}
    for job in jobs:
        job.cmd = _fake_cmd(job.workdir, [_row(0, 0.1, 0.3), _row(1, 0.2, 0.4)])
    assert paper_table.run_all([by["CREAM (dyn)", 0]], 1, parallel=1) == []
    shutil.rmtree(by["CREAM (dyn)", 0].workdir / "models")
    failures = paper_table.run_all(jobs, 1, parallel=2)
    assert f"SeRA seed 0: exit -1, see {by['SeRA', 0].workdir / 'train.log'}" in failures
    assert "CREAM (dyn) seed 0 failed" not in " ".join(failures)
    assert any(f.startswith("CREAM (dyn) seed 1: exit -1") for f in failures)
    assert "CREAM (dyn) seed 1 failed: 1 runs waiting for it were skipped" in failures  # SeRA seed 1, not run
    assert "cannot copy m0" in (by["SeRA", 0].workdir / "train.log").read_text()
    assert not (by["SeRA", 1].workdir / "train.log").exists()


def test_share_m1_trains_a_methods_own_m1_once(tmp_path):
    """With --share_m1, SRLM's M1 (IFT + EFT) is trained by its first seed's run and copied into its
    other seeds' runs, which wait for it; a failure there skips only the runs that copy from it."""
    jobs = paper_table.make_jobs([0, 1, 2], 1, tmp_path, [], methods=["CREAM (dyn)", "SRLM"], share_m1=True)
    by = {(j.method, j.seed): j for j in jobs}
    assert by["SRLM", 0].copy_from == by["CREAM (dyn)", 0].workdir and by["SRLM", 0].copy_models == ("m0",)
    for seed in (1, 2):
        assert by["SRLM", seed].copy_from == by["SRLM", 0].workdir and by["SRLM", seed].copy_models == ("m0", "m1")
        assert "Run.seed = %d" % seed in by["SRLM", seed].cmd
    for job in jobs:
        fail = job.method == "SRLM" and job.seed == 0
        job.cmd = _fake_cmd(job.workdir, None if fail else [_row(0, 0.1, 0.3), _row(1, 0.2, 0.4)], exit_code=4 if fail else 0)
    failures = paper_table.run_all(jobs, 1, parallel=1)
    assert failures == [f"SRLM seed 0: exit 4, see {by['SRLM', 0].workdir / 'train.log'}",
                        "SRLM seed 0 failed: 2 runs waiting for it were skipped"]
    assert all(by["CREAM (dyn)", s].workdir.joinpath("results.json").exists() for s in (0, 1, 2))
    assert not by["SRLM", 1].workdir.exists()
    # Rerun after the fix: SRLM's lift is measured from its own M1 (0.5 -> 0.6), not the shared SFT's (0.2).
    for job in jobs:
        if job.method == "SRLM":
            job.cmd = _fake_cmd(job.workdir, [_row(0, 0.5, 0.5), _row(1, 0.6, 0.6)])
    assert paper_table.run_all(jobs, 1, parallel=1) == []
    by_row = {(s["method"], s["iteration"]): s for s in paper_table.summarize(paper_table.collect(jobs))}
    assert by_row["SRLM", 1]["lift_vs_sft"][0] == pytest.approx(0.1)
    assert by_row["CREAM (dyn)", 1]["lift_vs_sft"][0] == pytest.approx(0.1)  # (0.2 + 0.4) / 2 - (0.1 + 0.3) / 2
