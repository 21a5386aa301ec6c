"""cream_jax.guards.param_norm and checkpoint.is_finite_tree: right values on sharded trees, and one
program per tree structure (not one eager reduction per leaf: the multi-process deadlock they fix)."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from cream_jax import checkpoint, guards, sharding


def _tree():
    mesh = sharding.make_mesh(2, 2, 2)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(8, 6)).astype(np.float32)
    return {
        "sharded": jax.device_put(a, sharding.batch_sharding(mesh, 2)),
        "bf16": jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16),
        "host": rng.normal(size=(3, 3)),
        "count": jnp.arange(4),  # integer leaves are not parameters
        "key": jax.random.key(0),
    }


def test_param_norm_is_the_l2_norm_of_the_float_leaves_in_one_program():
    tree = _tree()
    floats = [np.asarray(tree[k], np.float64).ravel() for k in ("sharded", "bf16", "host")]
    want = np.sqrt(sum((x ** 2).sum() for x in floats))
    before = guards._sum_of_squares._cache_size()
    for _ in range(3):
        np.testing.assert_allclose(guards.param_norm(tree), want, rtol=1e-6)
    assert guards._sum_of_squares._cache_size() == before + 1  # one program, compiled once
    assert guards.param_norm({"count": jnp.arange(3)}) == 0.0


def test_is_finite_tree_reduces_every_device_leaf_in_one_program():
    tree = _tree()
    before = checkpoint._all_finite._cache_size()
    assert checkpoint.is_finite_tree(tree)
    bad = {**tree, "sharded": tree["sharded"].at[7, 5].set(jnp.nan)}
    assert not checkpoint.is_finite_tree(bad)
    assert checkpoint._all_finite._cache_size() == before + 1


def test_a_resumed_phase_keeps_the_guard_history_of_the_steps_before_its_checkpoint(monkeypatch):
    """Train 6 logged steps straight through, and from the step-4 checkpoint: the resumed phase's
    guard compares against the same running median (not a fresh warm-up that would let a spike
    right after a resume through)."""
    from flax import nnx

    from cream_jax import config as config_lib, steps
    from cream_jax.loop import trainer as trainer_lib
    from cream_jax.models.llama import LlamaConfig
    from tests._tiny_models import TINY_LLAMA, random_batch, random_llama

    made = []

    class Recorded(guards.DivergenceGuard):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(guards, "DivergenceGuard", Recorded)

    class Writer:
        def scalars(self, step, values):
            pass

    cfg = LlamaConfig.from_hf(TINY_LLAMA)
    mesh = sharding.single_device_mesh()
    graphdef, params = nnx.split(random_llama(cfg, seed=1))
    params = sharding.shard_params(params, mesh)
    ids, mask = random_batch(8, 12, cfg.vocab_size, seed=3, left_pad=False, min_len=6)
    records = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask}
    optim = config_lib.OptimConfig(learning_rate=1e-2, batch_size=4)
    saves = []

    def train(resume=None):
        if resume is not None:
            resume = {**resume, "state": jax.tree.map(jnp.copy, resume["state"])}
        t = trainer_lib.Trainer(graphdef, mesh, Writer(),
                                # a copy: the train step donates the state it was given
                                lambda state, progress, extra: saves.append((jax.tree.map(jnp.copy, state), progress, extra)), checkpoint_every=2)
        t.train(name="sft", loss_fn=steps.lm_loss, loss_key="lm", records=records, optim=optim, params=params,
                progress_base={"stage": "sft"}, total_steps=6, resume=resume, seed=0)
        return made[-1].history

    straight = train()
    state, progress, extra = saves[1]
    assert progress["step"] == 4 and len(extra["guard"]["loss"]) == 4
    extra = checkpoint._from_json(json.loads(json.dumps(checkpoint._to_json(extra, "extra"))))  # as a checkpoint keeps it
    resumed = train({"state": state, "progress": progress, "extra": extra})
    assert len(straight["loss"]) == 6 and len(straight["grad_norm"]) == 6
    np.testing.assert_allclose(resumed["loss"], straight["loss"], rtol=1e-6)
    np.testing.assert_allclose(resumed["grad_norm"], straight["grad_norm"], rtol=1e-6)
    # A checkpoint from before the guard was kept still resumes (with a fresh history).
    train({"state": state, "progress": progress, "extra": {"loader": extra["loader"]}})
    assert len(made[-1].history["loss"]) == 2
