"""launch/*.sh: every script and command with --dry-run, clear failures on missing env, and the
real (not dry) paths run against stand-ins for gcloud / ssh / srun / scontrol / python that
record what each process would have started with."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TPU = REPO / "launch" / "tpu_pod.sh"
GPU = REPO / "launch" / "gpu_multinode.sh"
SCRIPTS = [TPU, GPU]

# Stand-ins. `python` (found through the fake venv) records its env and argv, one file per process.
FAKES = {
    "python": """#!/usr/bin/env bash
out="$RECORD_DIR/proc_${JAX_PROCESS_ID:-${TPU_WORKER_ID:-x}}"
{ echo "host=${FAKE_HOST:-} addr=${JAX_COORDINATOR_ADDRESS:-} n=${JAX_NUM_PROCESSES:-} id=${JAX_PROCESS_ID:-} pwd=$PWD"
  printf '%s\\n' "$@"; } > "$out"
[[ "${FAIL_ID:-none}" != "${JAX_PROCESS_ID:-}" ]]
""",
    "ssh": """#!/usr/bin/env bash
while [[ "$1" == -o ]]; do shift 2; done
FAKE_HOST="$1" exec bash -c "$2"
""",
    "srun": """#!/usr/bin/env bash
n=1
while [[ "$1" == --* ]]; do [[ "$1" == --ntasks=* ]] && n="${1#--ntasks=}"; shift; done
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i FAKE_HOST="node$i" "$@" & done
wait
""",
    "scontrol": """#!/usr/bin/env bash
[[ "$1 $2 $3" == "show hostnames gpu[001-002]" ]] && printf 'gpu001\\ngpu002\\n'
""",
    "gcloud": """#!/usr/bin/env bash
echo "$*" >> "$RECORD_DIR/gcloud_calls"
for arg in "$@"; do [[ "$arg" == --command=* ]] && cmd="${arg#--command=}"; done
[[ -n "${cmd:-}" ]] || exit 0
for w in 0 1; do (cd "$HOME" && TPU_WORKER_ID=$w FAKE_HOST="worker$w" bash -c "$cmd") || exit 1; done
""",
}


@pytest.fixture
def sandbox(tmp_path):
    """A PATH with the stand-ins, a checkout dir (with a space) holding a fake venv, a clean env."""
    bin_dir, records, checkout = tmp_path / "bin", tmp_path / "records", tmp_path / "remote checkout"
    for d in (bin_dir, records, checkout / ".venv" / "bin", tmp_path / "venv_bin"):
        d.mkdir(parents=True)
    for name, text in FAKES.items():
        target = (tmp_path / "venv_bin" if name == "python" else bin_dir) / name
        target.write_text(text)
        target.chmod(target.stat().st_mode | stat.S_IXUSR)
    (checkout / ".venv" / "bin" / "activate").write_text(f'export PATH="{tmp_path / "venv_bin"}:$PATH"\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "RECORD_DIR": str(records),
           "GIN_FILES": "configs/cream.gin, configs/models/llama3_8b.gin", "WORKDIR": str(tmp_path / "run dir"),
           "REMOTE_DIR": str(checkout)}
    return env, records, checkout


def launch(script, args, env):
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60)


def records_of(records: Path) -> dict[str, list[str]]:
    return {p.name: p.read_text().splitlines() for p in sorted(records.glob("proc_*"))}


TRAIN_ARGS = ["-m", "cream_jax.train", "--gin_file", "configs/cream.gin", "--gin_file", "configs/models/llama3_8b.gin",
              "--workdir"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_strict_and_documented(script):
    text = script.read_text()
    header = text.split("set -euo pipefail")[0]
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
    assert "Usage:" in header and "Required env:" in header and "--dry-run" in header
    assert script.stat().st_mode & stat.S_IXUSR
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


DRY_RUNS = [  # script, args, extra env, expected lines (substrings, in order)
    (TPU, ["create"], {"TPU_NAME": "pod", "ZONE": "us-central2-b", "ACCELERATOR_TYPE": "v4-32",
                       "RUNTIME_VERSION": "tpu-ubuntu2204-base", "PROJECT": "proj"},
     ["+ gcloud compute tpus tpu-vm create pod --zone=us-central2-b --project=proj --accelerator-type=v4-32 "
      "--version=tpu-ubuntu2204-base"]),
    (TPU, ["setup"], {"TPU_NAME": "pod", "ZONE": "z"},
     [f"+ git -C {REPO} archive --format=tar.gz -o", "+ gcloud compute tpus tpu-vm scp", "--worker=all",
      "+ gcloud compute tpus tpu-vm ssh pod --zone=z --worker=all --command=", "jax\\\\\\[tpu\\\\\\]==0.10.2"]),
    (TPU, ["run", "--", "--gin_param", "DPO.beta = 0.05"], {"TPU_NAME": "pod", "ZONE": "z"},
     ["+ gcloud compute tpus tpu-vm ssh pod --zone=z --worker=all --command=", "python\\ -m\\ cream_jax.train",
      "--gin_file\\ configs/cream.gin\\ --gin_file\\ configs/models/llama3_8b.gin", "DPO.beta"]),
    (TPU, ["delete"], {"TPU_NAME": "pod", "ZONE": "z"}, ["+ gcloud compute tpus tpu-vm delete pod --zone=z --quiet"]),
    (GPU, ["ssh"], {"HOSTS": "h0,h1"},
     ["+ ssh -o BatchMode=yes h0 export\\ JAX_COORDINATOR_ADDRESS=h0:61234\\ JAX_NUM_PROCESSES=2\\ JAX_PROCESS_ID=0",
      "+ ssh -o BatchMode=yes h1 export\\ JAX_COORDINATOR_ADDRESS=h0:61234\\ JAX_NUM_PROCESSES=2\\ JAX_PROCESS_ID=1"]),
    (GPU, ["slurm"], {"SLURM_JOB_NODELIST": "gpu[001-002]", "SLURM_JOB_NUM_NODES": "2", "COORDINATOR_PORT": "7000"},
     ["+ srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c export\\ "
      "JAX_COORDINATOR_ADDRESS=gpu001:7000\\ JAX_NUM_PROCESSES=2\\ JAX_PROCESS_ID=\\$SLURM_PROCID"]),
]


@pytest.mark.parametrize("script,args,extra,expected", DRY_RUNS, ids=lambda x: x.name if isinstance(x, Path) else None)
def test_dry_run_prints_the_commands_and_runs_nothing(sandbox, script, args, extra, expected):
    env, records, _ = sandbox
    result = launch(script, ["--dry-run", *args], {**env, **extra})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    position = 0
    for piece in expected:
        found = out.find(piece, position)
        assert found >= 0, f"{piece!r} not in order in:\n{out}"
        position = found
    assert not list(records.iterdir())  # no gcloud / ssh / srun / python was started


MISSING = [
    (TPU, ["run"], "TPU_NAME", {"ZONE": "z"}),
    (TPU, ["run"], "ZONE", {"TPU_NAME": "pod"}),
    (TPU, ["run"], "GIN_FILES", {"TPU_NAME": "pod", "ZONE": "z", "GIN_FILES": ""}),
    (TPU, ["create"], "ACCELERATOR_TYPE", {"TPU_NAME": "pod", "ZONE": "z"}),
    (GPU, ["ssh"], "HOSTS", {}),
    (GPU, ["ssh"], "WORKDIR", {"HOSTS": "a", "WORKDIR": ""}),
    (GPU, ["slurm"], "SLURM_JOB_NODELIST", {}),
]


@pytest.mark.parametrize("script,args,var,extra", MISSING, ids=lambda x: x.name if isinstance(x, Path) else None)
def test_missing_required_env_fails_with_one_clear_line(sandbox, script, args, var, extra):
    env, records, _ = sandbox
    result = launch(script, ["--dry-run", *args], {**env, **extra})
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {var} is not set (") and result.stderr.count("\n") == 1
    assert result.stdout == ""


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_unknown_command_prints_usage(sandbox, script):
    env, _, _ = sandbox
    result = launch(script, ["--dry-run", "launch-the-rockets"], {**env, "TPU_NAME": "pod", "ZONE": "z"})
    assert result.returncode == 2 and "error: unknown" in result.stderr and "Usage:" in result.stderr


def test_ssh_mode_starts_one_process_per_host(sandbox):
    env, records, checkout = sandbox
    result = launch(GPU, ["ssh", "--", "--gin_param", "DPO.beta = 0.05"], {**env, "HOSTS": "h0,h1,h2", "VENV": str(checkout / ".venv")})
    assert result.returncode == 0, result.stderr
    got = records_of(records)
    assert sorted(got) == ["proc_0", "proc_1", "proc_2"]
    for i in range(3):
        assert got[f"proc_{i}"][0] == f"host=h{i} addr=h0:61234 n=3 id={i} pwd={checkout}"
        assert got[f"proc_{i}"][1:] == [*TRAIN_ARGS, env["WORKDIR"], "--gin_param", "DPO.beta = 0.05"]


def test_ssh_mode_fails_when_one_process_fails(sandbox):
    env, records, checkout = sandbox
    result = launch(GPU, ["ssh"], {**env, "HOSTS": "h0,h1", "FAIL_ID": "1"})
    assert result.returncode == 1 and "error: a process failed" in result.stderr


def test_slurm_mode_starts_one_task_per_node(sandbox):
    env, records, checkout = sandbox
    result = launch(GPU, ["slurm"], {**env, "SLURM_JOB_NODELIST": "gpu[001-002]", "SLURM_JOB_NUM_NODES": "2"})
    assert result.returncode == 0, result.stderr
    got = records_of(records)
    assert [v[0] for v in got.values()] == [f"host=node{i} addr=gpu001:61234 n=2 id={i} pwd={checkout}" for i in (0, 1)]
    assert all(v[1:] == [*TRAIN_ARGS, env["WORKDIR"]] for v in got.values())


def test_tpu_run_starts_the_trainer_on_every_worker(sandbox):
    env, records, checkout = sandbox
    result = launch(TPU, ["run", "--", "--gin_param", "Run.seed = 3"], {**env, "TPU_NAME": "pod", "ZONE": "z"})
    assert result.returncode == 0, result.stderr
    got = records_of(records)
    assert sorted(got) == ["proc_0", "proc_1"]
    for w in (0, 1):
        # No JAX_* variables: on a TPU pod cream_jax.distributed gets them from the TPU metadata.
        assert got[f"proc_{w}"][0] == f"host=worker{w} addr= n= id= pwd={checkout}"
        assert got[f"proc_{w}"][1:] == [*TRAIN_ARGS, env["WORKDIR"], "--gin_param", "Run.seed = 3"]
    assert (records / "gcloud_calls").read_text().startswith("compute tpus tpu-vm ssh pod --zone=z --worker=all --command=")


def test_readme_covers_every_script_and_slice():
    readme = (REPO / "launch" / "README.md").read_text()
    for name in ("tpu_pod.sh", "gpu_multinode.sh", "v4-8", "v4-32", "v5e-16", "v5p-64", "A100", "H100"):
        assert name in readme, name
    assert os.access(TPU, os.X_OK) and os.access(GPU, os.X_OK)
