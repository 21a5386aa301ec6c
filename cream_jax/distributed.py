"""Multi-host start-up: one ``initialize`` for explicit flags, SLURM and TPU pods.

Every process of a multi-host run calls `initialize` once, before any other JAX call; afterwards
``jax.devices()`` lists the devices of all hosts and `cream_jax.sharding.make_mesh` builds the
global mesh over them. Where the process count, id and coordinator come from (``cluster="auto"``
tries them in this order):

  explicit  arguments, else the env vars ``JAX_COORDINATOR_ADDRESS`` ("host:port"),
            ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (what ``launch/gpu_multinode.sh`` sets).
            ``num_processes=1`` means a single process: nothing is initialised.
  slurm     inside ``srun`` with ``SLURM_NTASKS > 1``: count ``SLURM_NTASKS``, id ``SLURM_PROCID``,
            coordinator the first host of ``SLURM_STEP_NODELIST`` (``SLURM_JOB_NODELIST``) on port
            ``JAX_COORDINATOR_PORT``, else one derived from the job id as JAX's own SLURM
            detection does.
  tpu       on a Cloud TPU VM (libtpu installed and TPU device files present):
            ``jax.distributed.initialize()`` with no arguments; JAX reads the worker list and this
            worker's id from the TPU metadata (a single-host slice becomes one process).
  single    none of these: nothing is initialised.

Why not always call ``jax.distributed.initialize`` and let it detect the cluster: given a SLURM
environment, JAX limits each process to the one GPU numbered ``SLURM_LOCALID``, which is right
for one process per GPU but leaves 7 of 8 GPUs idle with one process per host (what the
launchers start). Here explicit and SLURM starts skip JAX's detection, and a process sees every
local device unless SLURM runs several tasks per node (then the GPU ``SLURM_LOCALID``).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
from collections.abc import Mapping

import jax

CLUSTERS = ("auto", "explicit", "slurm", "tpu", "single")


@dataclasses.dataclass(frozen=True)
class Distributed:
    """What `initialize` decided (and passed to ``jax.distributed.initialize``).

    ``mode`` is "explicit", "slurm", "tpu" or "single"; the other fields are None where JAX
    detects them itself (TPU) or nothing is initialised (single).
    """

    mode: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None


def _int(value: object, name: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"distributed: {name} must be an integer, got {value!r}") from None


def _explicit(coordinator_address: str | None, num_processes: int, process_id: int | None) -> Distributed:
    if num_processes < 1:
        raise ValueError(f"distributed: num_processes must be >= 1, got {num_processes}")
    if num_processes == 1:
        return Distributed("single")
    if not coordinator_address:
        raise ValueError(
            "distributed: num_processes > 1 needs coordinator_address (--coordinator_address or JAX_COORDINATOR_ADDRESS)"
        )
    if not re.fullmatch(r"\S+:\d+", coordinator_address):
        raise ValueError(f"distributed: coordinator_address must be 'host:port', got {coordinator_address!r}")
    if process_id is None:
        raise ValueError("distributed: num_processes > 1 needs process_id (--process_id or JAX_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"distributed: process_id must be in [0, {num_processes}), got {process_id}")
    return Distributed("explicit", coordinator_address, num_processes, process_id)


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[003-008,010],cpu1" -> "gpu003"."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None or not match.group(1):
        raise ValueError(f"distributed: cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    return prefix if ranges is None else prefix + re.split(r"[,-]", ranges)[0]


def _slurm(env: Mapping[str, str]) -> Distributed:
    n, pid = _int(env["SLURM_NTASKS"], "SLURM_NTASKS"), _int(env.get("SLURM_PROCID", ""), "SLURM_PROCID")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise ValueError("distributed: SLURM_NTASKS > 1 but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set")
    # The same port JAX's SLURM detection derives from the job id, unless JAX_COORDINATOR_PORT says otherwise.
    port = env.get("JAX_COORDINATOR_PORT") or str(_int(env.get("SLURM_JOB_ID", "0"), "SLURM_JOB_ID") % 4096 + 61440)
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or n
    nodes = _int(nodes, "SLURM_NNODES")
    local = None if n <= nodes else (_int(env.get("SLURM_LOCALID", "0"), "SLURM_LOCALID"),)
    return Distributed("slurm", f"{first_slurm_host(nodelist)}:{port}", n, pid, local)


def on_cloud_tpu_vm() -> bool:
    """Whether this host is a Cloud TPU VM: libtpu is installed and TPU device files exist."""
    has_chips = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
    return has_chips and importlib.util.find_spec("libtpu") is not None


def resolve(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cluster: str = "auto",
    env: Mapping[str, str] | None = None,
) -> Distributed:
    """Decides how this process joins the run, without initialising anything (see module doc).

    Args:
      coordinator_address: "host:port" of process 0; default env JAX_COORDINATOR_ADDRESS.
      num_processes: total processes; default env JAX_NUM_PROCESSES.
      process_id: this process's id in [0, num_processes); default env JAX_PROCESS_ID.
      cluster: "auto", or force one of "explicit", "slurm", "tpu", "single".
      env: environment to read (default ``os.environ``).

    Returns:
      A `Distributed` record.
    """
    if cluster not in CLUSTERS:
        raise ValueError(f"distributed: cluster must be one of {CLUSTERS}, got {cluster!r}")
    env = os.environ if env is None else env
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = _int(env["JAX_NUM_PROCESSES"], "JAX_NUM_PROCESSES")
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = _int(env["JAX_PROCESS_ID"], "JAX_PROCESS_ID")
    if cluster == "single":
        return Distributed("single")
    if cluster == "explicit" or (cluster == "auto" and num_processes is not None):
        if num_processes is None:
            raise ValueError("distributed: cluster='explicit' needs num_processes (--num_processes or JAX_NUM_PROCESSES)")
        return _explicit(coordinator_address, num_processes, process_id)
    slurm_tasks = _int(env.get("SLURM_NTASKS", "1"), "SLURM_NTASKS")
    if cluster == "slurm" or (cluster == "auto" and slurm_tasks > 1):
        if "SLURM_NTASKS" not in env:
            raise ValueError("distributed: cluster='slurm' but SLURM_NTASKS is not set (not inside srun?)")
        return _slurm(env) if slurm_tasks > 1 else Distributed("single")
    if cluster == "tpu" or (cluster == "auto" and on_cloud_tpu_vm()):
        return Distributed("tpu")
    return Distributed("single")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cluster: str = "auto",
) -> Distributed:
    """Joins this process to a multi-host run (see the module docstring); call before other JAX use.

    Args:
      coordinator_address: "host:port" of process 0; default env JAX_COORDINATOR_ADDRESS.
      num_processes: total processes; default env JAX_NUM_PROCESSES.
      process_id: this process's id; default env JAX_PROCESS_ID.
      cluster: "auto" (explicit -> SLURM -> TPU -> single) or one of them forced.

    Returns:
      The `Distributed` record that was acted on (mode "single": nothing was done).
    """
    spec = resolve(coordinator_address, num_processes, process_id, cluster=cluster)
    if spec.mode != "single":
        # CPU backends only (GPU and TPU ignore the flag), set before the backend starts: with
        # asynchronous dispatch of single-device programs, the two processes of a CPU run deadlocked
        # in about 4 of 10 CLI runs (one in a gloo all-reduce of a train step, the other in the
        # checkpoint barrier that follows); with it off, none in 8. That was not the whole cause: CI
        # still hung there (2 of 2 runs) until the guard's per-leaf eager reductions became one
        # jitted program (`guards.param_norm`): 2 of 6 reruns of that CLI run hung before, 0 of 8 since.
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    if spec.mode == "tpu":
        jax.distributed.initialize()
    elif spec.mode != "single":
        jax.distributed.initialize(
            spec.coordinator_address, spec.num_processes, spec.process_id,
            local_device_ids=list(spec.local_device_ids) if spec.local_device_ids else None,
            cluster_detection_method="deactivate",
        )
    return spec
