"""The miniature CREAM table: every method on the embedded suite, several seeds, one command.

    python experiments/paper_table.py                # 7 configurations x 3 seeds x 3 iterations
    python experiments/paper_table.py --quick        # a 2-minute smoke version of the same pipeline
    # issue 13's stage A: the oracle positive control on SmolLM2-135M-Instruct, one M1 for all seeds
    python experiments/paper_table.py --base_gin configs/models/smollm2_135m_instruct.gin \
        --methods "Oracle DPO" --iterations 2 --share_m1 --jobs 1 --root runs/smollm2_stage_a \
        --out experiments/results/smollm2_stage_a

Each run is the real trainer (``python -m cream_jax.train``) with the embedded default
(``configs/tiny_cpu.gin``, or ``--base_gin``) plus the method's config file and ``Run.iterations = 3``; nothing else
is changed per method (the hyper-parameters are fixed in METHOD_CONFIGS below, before any test
accuracy was looked at). The seed (``Run.seed``) changes the model's initialisation, the data order
and every sampling key; the data (suite, test sets) stay the same across seeds.

M0 (pre-training) and M1 (SFT) do not depend on the method except that SRLM's and SCIR's M1 also learn
to judge (SFT on IFT + EFT, METHODS 3.1; SCIR: + pairwise judge chats). So per seed the CREAM (dyn) run
trains M0 and M1, and the other runs start from copies of its ``models/m0`` (and ``models/m1``, not for
SRLM and SCIR): the trainer finds them in
its model store and skips those stages, exactly as it does when it resumes. "SFT" in the table is M1.
With ``--methods`` the first listed method (CREAM (dyn) if listed) is the base. With ``--share_m1``
every seed starts from the first seed's M0 and M1 (a budget cut for models whose SFT is expensive:
the intervals then cover the self-rewarding loop's randomness, not SFT's); M0 is evaluated once, and
a method with its own M1 (SRLM, SCIR) trains it once, at the first seed, for all its seeds.
A run starts only after the run it copies its models from has finished.
"lift" columns are paired per seed: the method's mean accuracy minus its seed's M1's (for SRLM and SCIR
their own M1's).

Runs go to ``--root`` (one workdir each; an interrupted invocation resumes: finished runs are skipped,
unfinished ones resume from their checkpoints). ``--jobs`` runs go in parallel (the tiny model
does not keep 2 cores busy on its own). The aggregate goes to ``--out``: summary.json (every number),
table.md (mean +- 95% CI over seeds) and accuracy.png. docs/results.md discusses them.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cream_jax.sweep import finished

REPO = Path(__file__).resolve().parent.parent
BASE = "CREAM (dyn)"

# name -> (gin files after configs/tiny_cpu.gin, extra bindings). Fixed before any result was seen.
METHOD_CONFIGS: dict[str, tuple[list[str], list[str]]] = {
    BASE: (["configs/cream.gin"], []),
    "CREAM (avg)": (["configs/cream.gin"], ["CREAM.consistency_level = 'avg'"]),
    "SRLM": (["configs/srlm.gin"], []),
    # Added after the first table: the full rubric (~800 tokens) does not fit the tiny model's 256
    # positions nor SFT.max_len = 96, so the judge prompts above were cut and the EFT examples taught
    # nothing (see docs/results.md). This row gives SRLM a judge prompt that fits; nothing else changes.
    "SRLM (compact judge)": (["configs/srlm.gin"], ["SRLM.judge_template = 'compact'", "SFT.max_len = 224"]),
    "SeRA": (["configs/sera.gin"], []),
    "SCIR": (["configs/scir.gin"], []),
    "Oracle DPO": (["configs/dpo_oracle.gin"], []),
    # Issue 13's stage B: CREAM (dyn) with the length-controlled reward (configs/length_control.gin).
    "CREAM (length-controlled)": (["configs/cream.gin", "configs/length_control.gin"], []),
}
# Without --methods: the toy table's 7 configurations (docs/results.md), as first run.
TOY_TABLE_METHODS = [BASE, "CREAM (avg)", "SRLM", "SRLM (compact judge)", "SeRA", "SCIR", "Oracle DPO"]
ROW_ORDER = ["M0", "SFT", "SRLM", "SRLM (compact judge)", BASE, "CREAM (avg)", "CREAM (length-controlled)", "SeRA",
             "SCIR", "Oracle DPO"]
def trains_own_m1(method: str) -> bool:
    """SRLM's M1 is SFT on IFT + EFT (METHODS 3.1) and SCIR's on IFT + pairwise judge chats
    (`SCIR.eft_pairs`, METHODS 5.2), so they do not start from the base run's M1. (The toy table of
    docs/results.md predates SCIR's entry here: its SCIR runs copied the base run's M1.)"""
    return any(f in METHOD_CONFIGS[method][0] for f in ("configs/srlm.gin", "configs/scir.gin"))


def m1_label(method: str) -> str:
    """The table's name for a method's own M1."""
    return method + (" (M1: IFT+pairwise judge)" if "configs/scir.gin" in METHOD_CONFIGS[method][0] else " (M1: IFT+EFT)")


def base_method(methods: list[str]) -> str:
    """The run every other method copies M0 (and, unless it trains its own, M1) from."""
    return BASE if BASE in methods else methods[0]


def method_bindings(specs: list[str], methods: list[str]) -> dict[str, list[str]]:
    """``"METHOD: binding"`` strings (--method_param) -> {method: [binding, ...]} for the listed ``methods``
    (a known method that is not listed is skipped, so one set of flags serves invocations that grow)."""
    out: dict[str, list[str]] = {}
    base = base_method(methods) if methods else BASE
    for spec in specs:
        method, sep, binding = spec.partition(":")
        method, binding = method.strip(), binding.strip()
        if not sep or "=" not in binding or method not in METHOD_CONFIGS:
            raise ValueError(f"--method_param {spec!r}: expected 'METHOD: Section.field = value' with METHOD one of "
                             f"{', '.join(METHOD_CONFIGS)}")
        # Bindings of a stage a run does not run would only mislabel its rows: every run but the base copies
        # M0 (no pre-training), and only the base and methods with their own M1 run SFT.
        section = binding.split("=")[0].strip().split(".")[0]
        if method == base and section in ("SFT", "SFTOptim", "Pretrain", "PretrainOptim"):
            raise ValueError(f"--method_param {spec!r}: {method} is the base run, whose M0 and M1 every other "
                             "method starts from: set it for all with --gin_param")
        if section in ("Pretrain", "PretrainOptim") and method != base:
            raise ValueError(f"--method_param {spec!r}: {method}'s runs copy the base run's M0, so a pre-training "
                             "binding would have no effect")
        if section in ("SFT", "SFTOptim") and not trains_own_m1(method):
            raise ValueError(f"--method_param {spec!r}: {method}'s runs copy the base run's M0 and M1, so an SFT "
                             "binding would have no effect")
        if method in methods:
            out.setdefault(method, []).append(binding)
    return out


QUICK_BINDINGS = ["Pretrain.steps = 20", "SFT.epochs = 1", "Data.prompts_per_iteration = 32", "Eval.num_per_task = 32"]


@dataclasses.dataclass
class Job:
    method: str
    seed: int
    workdir: Path
    cmd: list[str]
    copy_from: Path | None = None  # the run whose M0 (and M1) this run starts from; it must finish first
    copy_models: tuple[str, ...] = ()
    is_base: bool = False  # trains (or, with --share_m1, copies) its seed's M0 and M1

    @property
    def name(self) -> str:
        return f"{self.method} seed {self.seed}"


def slug(method: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in method.lower()).strip("_").replace("__", "_")


def make_jobs(seeds: list[int], iterations: int, root: Path, extra: list[str], base_gin: str = "configs/tiny_cpu.gin",
              methods: list[str] | None = None, share_m1: bool = False,
              per_method: dict[str, list[str]] | None = None) -> list[Job]:
    methods = list(TOY_TABLE_METHODS) if methods is None else methods
    unknown = [m for m in methods if m not in METHOD_CONFIGS]
    if unknown or not methods:
        raise ValueError(f"--methods: unknown {unknown or 'empty list'}; known: {', '.join(METHOD_CONFIGS)}")
    duplicates = sorted({m for m in methods if methods.count(m) > 1})
    if duplicates:
        raise ValueError(f"--methods: listed twice: {', '.join(duplicates)}")
    base = base_method(methods)
    if trains_own_m1(base):
        raise ValueError(f"--methods: the base run ({base}) must use the shared M1; list another method first")
    jobs = []
    for seed in seeds:
        base_dir = root / f"seed{seed}" / slug(base)
        for method in methods:
            files, bindings = METHOD_CONFIGS[method]
            workdir = root / f"seed{seed}" / slug(method)
            cmd = [sys.executable, "-m", "cream_jax.train", "--workdir", str(workdir),
                   "--gin_file", str(REPO / base_gin)]
            for f in files:
                cmd += ["--gin_file", str(REPO / f)]
            shared = share_m1 and seed != seeds[0]
            for b in [f"Run.seed = {seed}", f"Run.iterations = {iterations}", *bindings, *extra,
                      *(per_method or {}).get(method, []),
                      *(["Eval.m0 = False"] if shared or method != base else [])]:
                cmd += ["--gin_param", b]
            if method == base:
                if shared:
                    jobs.append(Job(method, seed, workdir, cmd, copy_from=root / f"seed{seeds[0]}" / slug(base),
                                    copy_models=("m0", "m1"), is_base=True))
                else:
                    jobs.append(Job(method, seed, workdir, cmd, is_base=True))
            elif trains_own_m1(method) and shared:  # its own M1, trained once at the first seed, like the base's
                jobs.append(Job(method, seed, workdir, cmd, copy_from=root / f"seed{seeds[0]}" / slug(method),
                                copy_models=("m0", "m1")))
            else:
                models = ("m0",) if trains_own_m1(method) else ("m0", "m1")
                jobs.append(Job(method, seed, workdir, cmd, copy_from=base_dir, copy_models=models))
    return jobs


COPY_FAILED = -1  # run_job's exit code when the models it starts from could not be copied


def run_job(job: Job) -> tuple[Job, int, float]:
    job.workdir.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    for name in job.copy_models:  # only before the run's first start; a resumed run has its own
        src, dst = job.copy_from / "models" / name, job.workdir / "models" / name
        if not dst.exists():
            tmp = dst.with_name(name + ".copying")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                shutil.copytree(src, tmp)
            except OSError as e:  # e.g. a finished run whose models were deleted: this run fails, not the table
                with open(job.workdir / "train.log", "a") as log:
                    log.write(f"paper_table: cannot copy {name} from {src}: {e}\n")
                return job, COPY_FAILED, time.perf_counter() - tic
            tmp.rename(dst)  # atomic: the store never sees half a model
    with open(job.workdir / "train.log", "a") as log:
        log.write(f"$ {shlex.join(job.cmd)}\n")
        log.flush()
        rc = subprocess.call(job.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return job, rc, time.perf_counter() - tic


def run_all(jobs: list[Job], iterations: int, parallel: int) -> list[str]:
    """Runs the jobs, each only after the run it copies its models from; returns failures."""
    todo = [j for j in jobs if not finished(j.workdir, iterations)]
    done = {j.workdir for j in jobs if j not in todo}
    failures: list[str] = []
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already finished; {len(todo)} to run, {parallel} at a time", flush=True)
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(parallel) as pool:
        running: set[cf.Future] = set()
        while todo or running:
            ready = [j for j in todo if j.copy_from is None or j.copy_from in done]
            # Runs that others copy from first (the bases, a method's own first-seed M1): they unlock the rest.
            gates = {j.copy_from for j in todo}
            ready.sort(key=lambda j: (not j.is_base, j.workdir not in gates, j.seed))
            for job in ready[: parallel - len(running)]:
                todo.remove(job)
                print(f"[{time.perf_counter() - t0:7.0f}s] start  {job.name}  (log: {job.workdir / 'train.log'})", flush=True)
                running.add(pool.submit(run_job, job))
            if not running:  # what is left waits for runs that failed (a defensive stop; see below)
                failures += [f"{j.name}: the run it copies from did not finish" for j in todo]
                break
            finished_now, running = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished_now:
                job, rc, seconds = fut.result()
                status = "done" if rc == 0 else ("FAILED (model copy)" if rc == COPY_FAILED else f"FAILED (exit {rc})")
                print(f"[{time.perf_counter() - t0:7.0f}s] {status:6s} {job.name} in {seconds:.0f}s", flush=True)
                if rc:
                    failures.append(f"{job.name}: exit {rc}, see {job.workdir / 'train.log'}")
                    blocked, frontier = [], {job.workdir}
                    while frontier:  # every run that copies from it, directly or through another
                        now = [j for j in todo if j.copy_from in frontier]
                        blocked += now
                        frontier = {j.workdir for j in now}
                        todo = [j for j in todo if j not in now]
                    if blocked:
                        failures += [f"{job.name} failed: {len(blocked)} runs waiting for it were skipped"]
                else:
                    done.add(job.workdir)
    return failures


# ------------------------------------------------------------------------------------------
# Aggregation.


def t_quantile(n: int) -> float:
    from scipy import stats  # noqa: PLC0415 — only the aggregation needs it (test extra)

    return float(stats.t.ppf(0.975, n - 1))


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% Student-t interval over seeds (None for one seed)."""
    x = np.asarray([v for v in values if v is not None], float)
    if len(x) == 0:
        return float("nan"), None
    if len(x) == 1:
        return float(x[0]), None
    return float(x.mean()), t_quantile(len(x)) * float(x.std(ddof=1)) / math.sqrt(len(x))


def collect(jobs: list[Job]) -> dict:
    """method -> iteration -> per-seed rows (M0 = the base runs' iteration -1, SFT = their iteration 0)."""
    table: dict[str, dict[int, list[dict]]] = {}
    for job in jobs:
        path = job.workdir / "results.json"
        if not path.exists():
            continue
        results = json.loads(path.read_text())
        settings = run_settings(results.get("config") or {})
        for row in results["iterations"]:
            t = row["iteration"]
            if t <= 0 and not job.is_base and not (t == 0 and trains_own_m1(job.method)):
                continue  # the same M0 / M1 as the base run's
            method = {-1: "M0", 0: "SFT"}.get(t, job.method) if job.is_base else job.method
            table.setdefault(method, {}).setdefault(t, []).append({"seed": job.seed, **row, "settings": settings})
    return table


def run_settings(config: dict) -> dict:
    """The settings a run actually used (read back from its results.json, not from this invocation's flags)."""
    dpo, ev = config.get("dpo") or {}, config.get("eval") or {}
    return {"dpo_learning_rate": (dpo.get("optim") or {}).get("learning_rate"), "dpo_beta": dpo.get("beta"),
            "dpo_epochs": dpo.get("epochs"), "eval_num_per_task": ev.get("num_per_task"),
            "sft_max_len": (config.get("sft") or {}).get("max_len"),
            "prompts_per_iteration": (config.get("data") or {}).get("prompts_per_iteration")}


def _mean_accuracy(row: dict) -> float:
    return float(np.mean([row["accuracy"][k] for k in sorted(row["accuracy"])]))


def _mean_or_none(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def summarize(table: dict) -> list[dict]:
    out = []
    sft_by_seed = {r["seed"]: _mean_accuracy(r) for r in table.get("SFT", {}).get(0, [])}
    for method in ROW_ORDER:
        for t, rows in sorted(table.get(method, {}).items()):
            tasks = sorted(rows[0]["accuracy"])
            acc = {task: mean_ci([r["accuracy"][task] for r in rows]) for task in tasks}
            acc["mean"] = mean_ci([_mean_accuracy(r) for r in rows])
            # Paired per seed against that seed's M1 (the decision statistic of the real-model protocol).
            # A method with its own M1 (SRLM: IFT + EFT) is measured from that M1, its starting point.
            own_m1 = {r["seed"]: _mean_accuracy(r) for r in table.get(method, {}).get(0, [])}
            start = own_m1 or sft_by_seed
            paired = [_mean_accuracy(r) - start[r["seed"]] for r in rows if r["seed"] in start]
            lift = mean_ci(paired) if t > 0 and paired else None
            cons = [r["consistency"] for r in rows if r.get("consistency") and r["consistency"].get("mean") is not None]
            settings = {json.dumps(r.get("settings"), sort_keys=True) for r in rows}
            if len(settings) > 1:  # seeds run with different settings are not replicates of one row
                raise ValueError(f"{method} iteration {t}: the seeds' runs used different settings: {sorted(settings)}")
            out.append({
                "method": m1_label(method) if t == 0 and method != "SFT" else method,
                "iteration": t, "model": rows[0]["model"], "seeds": [r["seed"] for r in rows],
                "accuracy": acc,
                "settings": rows[0].get("settings"),
                "lift_vs_sft": lift,
                "reward_accuracy": mean_ci([r.get("reward_accuracy") for r in rows]) if t > 0 else None,
                # pairs the oracle orders strictly (the reward accuracy's denominator), absent in older runs
                "reward_accuracy_pairs": (float(np.mean([r["reward_accuracy_pairs"] for r in rows]))
                                          if t > 0 and all("reward_accuracy_pairs" in r for r in rows) else None),
                "consistency_mean": mean_ci([c["mean"] for c in cons]) if cons else None,
                "consistency_std": float(np.mean([c["std"] for c in cons])) if cons else None,
                "pairs_kept": mean_ci([r.get("pairs_kept") for r in rows]) if t > 0 else None,
                # mean tokens of the greedy eval answers, and of the kept pairs' chosen / rejected
                # responses (absent in runs from before results rows carried them)
                "response_tokens": {k: _mean_or_none([(r.get("response_tokens") or {}).get(k) for r in rows])
                                    for k in ("eval", "chosen", "rejected")},
                "seconds": float(np.mean([r["seconds"].get("total", sum(r["seconds"].values())) for r in rows])),
                "per_seed": rows,
            })
    return out


def _pm(mc: tuple[float, float | None] | None, scale: float = 100.0, digits: int = 1) -> str:
    if mc is None or mc[0] is None or (isinstance(mc[0], float) and math.isnan(mc[0])):
        return "-"
    mean, half = mc
    return f"{mean * scale:.{digits}f}" + (f" ± {half * scale:.{digits}f}" if half is not None else "")


def _token_cells(tokens: dict) -> list[str]:
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    pair = "-" if tokens.get("chosen") is None else f"{fmt(tokens['chosen'])} / {fmt(tokens.get('rejected'))}"
    return [fmt(tokens.get("eval")), pair]


def markdown(summary: list[dict]) -> str:
    tasks = [k for k in summary[0]["accuracy"] if k != "mean"] if summary else []
    head = (["method", "model"] + [f"{t} acc %" for t in tasks]
            + ["mean acc %", "lift vs M1 (pts)", "reward acc %", "consistency (mean ± std)", "pairs kept",
               "answer tokens", "chosen / rejected tokens", "seeds"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cons = "-" if s["consistency_mean"] is None else f"{s['consistency_mean'][0]:.3f} ± {s['consistency_std']:.3f}"
        cells = ([s["method"], s["model"]] + [_pm(s["accuracy"][t]) for t in tasks] + [_pm(s["accuracy"]["mean"]), _pm(s.get("lift_vs_sft"))]
                 + [_pm(s["reward_accuracy"]) + ("" if s.get("reward_accuracy_pairs") is None else f" (n {s['reward_accuracy_pairs']:.0f})"), cons, _pm(s["pairs_kept"], scale=1.0, digits=0)]
                 + _token_cells(s.get("response_tokens") or {}) + [str(len(s["seeds"]))])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    tasks = [k for k in summary[0]["accuracy"] if k != "mean"]
    sft = [s for s in summary if s["method"] == "SFT"]
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(5 * (len(tasks) + 1), 4))
    methods = [m for m in ROW_ORDER if m not in ("M0", "SFT") and any(s["method"] == m for s in summary)]
    for ax, task in zip(axes, tasks, strict=False):
        for i, method in enumerate(methods):
            own_m1 = [s for s in summary if s["method"] == m1_label(method)]  # SRLM's and SCIR's M1 are their own
            rows = (own_m1 or sft) + [s for s in summary if s["method"] == method]
            xs = [s["iteration"] + (i - len(methods) / 2) * 0.03 for s in rows]
            ys = [100 * s["accuracy"][task][0] for s in rows]
            err = [100 * (s["accuracy"][task][1] or 0.0) for s in rows]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method)
        ax.set_title(f"{task}: test accuracy (mean ± 95% CI)")
        ax.set_xlabel("iteration t (0 = M1 after SFT)")
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
    ax = axes[-1]
    for method in methods:
        rows = [s for s in summary if s["method"] == method and s["consistency_mean"] is not None]
        if rows:
            ax.errorbar([s["iteration"] for s in rows], [s["consistency_mean"][0] for s in rows],
                        yerr=[s["consistency_mean"][1] or 0.0 for s in rows], marker="o", capsize=3, label=method)
    ax.set_title("consistency rate C (mean over prompts)")
    ax.set_xlabel("iteration t")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--root", default="runs/paper_table", help="parent of the runs' workdirs")
    parser.add_argument("--out", default="experiments/results", help="summary.json, table.md, accuracy.png")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    parser.add_argument("--quick", action="store_true", help="tiny smoke version: " + "; ".join(QUICK_BINDINGS))
    parser.add_argument("--gin_param", action="append", default=[], help="extra binding for every run")
    parser.add_argument("--method_param", action="append", default=[],
                        help="'METHOD: binding' for one method's runs only (e.g. 'SRLM: SFT.max_len = 448')")
    parser.add_argument("--base_gin", default="configs/tiny_cpu.gin", help="the model/data preset every run starts from")
    parser.add_argument("--methods", default=",".join(TOY_TABLE_METHODS),
                        help=f"comma-separated rows of METHOD_CONFIGS to run (default: the toy table's); known: {', '.join(METHOD_CONFIGS)}")
    parser.add_argument("--share_m1", action="store_true", help="every seed starts from the first seed's M0 and M1")
    parser.add_argument("--aggregate_only", action="store_true", help="only rebuild the outputs from finished runs")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    extra = (QUICK_BINDINGS if args.quick else []) + args.gin_param
    root, out = Path(args.root), Path(args.out)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        per_method = method_bindings(args.method_param, methods)
        jobs = make_jobs(seeds, args.iterations, root, extra, args.base_gin, methods, args.share_m1, per_method)
    except ValueError as e:
        parser.error(str(e))
    tic = time.perf_counter()
    failures = [] if args.aggregate_only else run_all(jobs, args.iterations, args.jobs)
    wall = time.perf_counter() - tic
    try:
        summary = summarize(collect(jobs))
    except ValueError as e:
        for f in failures:
            print("failed: " + f, file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not summary:
        print("error: no finished run to aggregate under " + str(root), file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    if args.aggregate_only:  # keep the wall time and bindings of the invocation that ran the runs
        previous = out / "summary.json"
        before = json.loads(previous.read_text())["meta"] if previous.exists() else {}
        wall = before.get("wall_seconds")
        extra = extra or before.get("extra_bindings", [])
    # seeds and iterations are what this pass aggregated; how the runs' models were shared is the running pass's.
    share_m1 = args.share_m1 or (args.aggregate_only and before.get("share_m1", False))
    meta = {"seeds": seeds, "iterations": args.iterations, "extra_bindings": extra, "wall_seconds": wall,
            "share_m1": share_m1,
            "methods": {m: {"gin_files": [args.base_gin, *METHOD_CONFIGS[m][0]],
                            "bindings": METHOD_CONFIGS[m][1] + per_method.get(m, [])} for m in methods}}
    if args.aggregate_only and not args.method_param:  # the per-method bindings the runs were made with
        meta["methods"].update({m: v for m, v in before.get("methods", {}).items() if m in methods})
    (out / "summary.json").write_text(json.dumps({"meta": meta, "rows": summary}, indent=1, default=float))
    (out / "table.md").write_text(markdown(summary))
    plot(summary, out / "accuracy.png")
    print(markdown(summary))
    if not args.aggregate_only:
        print(f"wall time {wall / 60:.1f} min for {len(jobs)} runs ({args.jobs} in parallel); outputs in {out}")
    for f in failures:
        print("failed: " + f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
