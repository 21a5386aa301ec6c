"""A sharded DPO run on the real engine, shared by the multi-host test and its worker processes.

As a script (``python -m tests._multihost_worker --out DIR``) it is one process of a multi-process
run: it joins through `cream_jax.distributed.initialize` (JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID from the environment), trains `STEPS` DPO steps on a
(data=2, fsdp=2, tensor=2) mesh over the devices of all processes, writes a checkpoint with
`cream_jax.checkpoint.RunCheckpointer` (when there are several processes), exports the trained
model with `save_hf_llama` and loads the export back with `load_hf_llama` onto the mesh, and
process 0 writes the losses, the final params and the reloaded params to DIR. With ``--restore
DIR2`` it also restores, without a target, the checkpoint and model snapshot that the test process
wrote to DIR2 on 8 devices of one process (a topology this run lacks). The test runs the same
functions in one process on 8 devices for the reference.

Shape letters: B pairs, T time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from cream_jax import distributed, sharding, steps
from cream_jax.checkpoint import ModelStore, RunCheckpointer
from cream_jax.config import OptimConfig
from cream_jax.models.hf import load_hf_llama, save_hf_llama
from cream_jax.models.llama import Llama, LlamaConfig

CONFIG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
# eps=1e-3: Adam's first updates g / (|g| + eps) are ill-conditioned for near-zero gradients (an
# embedding row of a token seen once), where a cross-process reduction order alone moved one entry
# by 1.3e-5 with eps=1e-8; the comparison is about sharding, not about that.
OPTIM = OptimConfig(learning_rate=1e-2, weight_decay=0.01, eps=1e-3)
STEPS = 3
B, T = 8, 16


def host_batch(step: int) -> dict[str, np.ndarray]:
    """The global batch of one step (identical on every process): B pairs of length T."""
    rng = np.random.default_rng(step)
    batch = {}
    for side in ("chosen", "rejected"):
        length = rng.integers(8, T + 1, size=B)  # right padding after `length` tokens
        mask = (np.arange(T)[None, :] < length[:, None]).astype(np.int32)  # (B, T)
        batch[f"{side}_ids"] = (rng.integers(3, CONFIG.vocab_size, size=(B, T)) * mask).astype(np.int32)
        batch[f"{side}_mask"] = mask
        batch[f"{side}_resp"] = (mask * (np.arange(T)[None, :] >= 5)).astype(np.int32)  # prompt = first 5 tokens
    batch["ref_chosen"] = rng.normal(-40.0, 3.0, size=B).astype(np.float32)
    batch["ref_rejected"] = rng.normal(-40.0, 3.0, size=B).astype(np.float32)
    batch["consistency"] = rng.uniform(0.5, 1.0, size=B).astype(np.float32)
    batch["weight"] = np.array([1.0] * (B - 1) + [0.0], np.float32)  # one padding row
    return batch


def global_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Global arrays sharded over ("data", "fsdp"); each process supplies only its own shards."""
    out = {}
    for key, value in batch.items():
        spec = NamedSharding(mesh, P(sharding.LOGICAL_AXIS_RULES["batch"], *([None] * (value.ndim - 1))))
        out[key] = jax.make_array_from_callback(value.shape, spec, lambda index, v=value: v[index])
    return out


def _replicated(x, mesh) -> jax.Array:
    """``x`` replicated over the mesh; each process fills its own devices from its local copy."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_replicated(jax.random.key_data(x), mesh))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, NamedSharding(mesh, P()), lambda index: host[index])


def init_state(mesh) -> tuple[object, dict]:
    """Random params (numpy seed 0, the same on every process) sharded by their logical names, and a
    fresh train state on the mesh (`steps.init_train_state`)."""
    # Abstract init, then host values: the same on every process and no init kernels to compile.
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Llama(CONFIG, rngs=nnx.Rngs(0))), nnx.Param)
    gen = np.random.default_rng(0)

    def fill(variable, names):
        shape = variable.get_value().shape
        norm = names is not None and names[-1] == "norm"
        return variable.replace(np.ones(shape, np.float32) if norm else gen.normal(0.0, 0.02, shape).astype(np.float32))

    params = jax.tree.map(fill, params, sharding.param_logical_names(params), is_leaf=lambda x: isinstance(x, nnx.Variable))
    params = sharding.shard_params(params, mesh)
    # init_train_state device_puts the key onto the mesh: a typed key on one device cannot go to
    # other processes' devices that way ("must represent addressable devices"), a global one can.
    rng = _replicated(jax.random.key(0), mesh)
    return graphdef, steps.init_train_state(params, steps.make_optimizer(OPTIM), rng)


def make_step(graphdef, state: dict, mesh):
    loss_fn = steps.make_dpo_loss(beta=0.1)
    return steps.make_train_step(loss_fn, graphdef, steps.make_optimizer(OPTIM), mesh, steps.state_shardings(state))


def run(train_step, state: dict, mesh, first: int, last: int) -> tuple[dict, list[float]]:
    """Steps ``first..last-1``; the loss of each (replicated, so readable on every process)."""
    losses = []
    for step in range(first, last):
        batch = global_batch(host_batch(step), mesh)
        batch["lr"] = _replicated(np.float32(OPTIM.learning_rate), mesh)
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def host_params(state: dict) -> dict[str, np.ndarray]:
    """Every parameter gathered to the host, keyed by its path."""
    leaves = jax.tree_util.tree_leaves_with_path(state["params"])
    gathered = multihost_utils.process_allgather([leaf for _, leaf in leaves], tiled=True)
    return {jax.tree_util.keystr(path): np.asarray(g) for (path, _), g in zip(leaves, gathered)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--restore", default=None)
    args = parser.parse_args()
    joined = distributed.initialize()  # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    out = Path(args.out)
    mesh = sharding.make_mesh(2, 2, 2)
    graphdef, state = init_state(mesh)
    state, losses = run(make_step(graphdef, state, mesh), state, mesh, 0, STEPS)
    if jax.process_count() > 1:  # the test restores only the multi-process checkpoint
        with RunCheckpointer(out / "ckpt", async_save=False) as ckpt:
            ckpt.save(STEPS, state, {"step": STEPS})
    params = host_params(state)
    # HF export from sharded params (every process gathers, process 0 writes; two files, so the
    # index is exercised), then a load that reads on each process only its devices' slices.
    save_hf_llama(nnx.merge(graphdef, state["params"]), CONFIG, str(out / "hf"), max_shard_bytes=200_000)
    loaded, _ = load_hf_llama(str(out / "hf"), mesh=mesh)
    loaded_state = nnx.state(loaded, nnx.Param)
    specs_match = all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(loaded_state), jax.tree.leaves(state["params"])))
    reloaded = host_params({"params": loaded_state})
    restored = {}
    if args.restore:  # saved devices gone: every process must still read every array whole
        with RunCheckpointer(Path(args.restore) / "ckpt") as ckpt:
            state_read, _, _ = ckpt.restore()
        store = ModelStore(Path(args.restore) / "models")
        restored = {"ckpt": state_read, "store": store.load("m")}
        store.close()
        restored = {f"{where}/{k}": np.asarray(v) for where, tree in restored.items() for k, v in tree.items()}
        np.savez(out / f"restored_{jax.process_index()}.npz", **restored)
    if jax.process_index() == 0:
        np.savez(out / "params.npz", **params)
        np.savez(out / "reloaded.npz", **reloaded)
        info = {"losses": losses, "mode": joined.mode, "process_count": jax.process_count(),
                "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
                "reload_shardings_match": specs_match}
        (out / "result.json").write_text(json.dumps(info))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
