"""The loop's resident models: M0 and M_{t-1}, only scored at iteration t, are held in the compute
dtype when it is narrower than the master weights' (bf16 compute, fp32 params), on the same
shardings; M_t, the policy being trained, stays in float32 (issue 11, DESIGN "Scale rules")."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cream_jax import checkpoint, sharding
from cream_jax.engine.host import score_sequences
from cream_jax.loop.stages import Run
from cream_jax.models.llama import LlamaConfig
from tests._tiny_models import TINY_LLAMA, random_batch, random_llama

FIELDS = {f.name for f in dataclasses.fields(LlamaConfig)}


def _run(dtype, param_dtype, store=None):
    mc = LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k in FIELDS}, dtype=dtype, param_dtype=param_dtype)
    mesh = sharding.make_mesh(data=2, fsdp=4)
    models = []
    for seed in range(3):
        graphdef, state = nnx.split(random_llama(mc, seed=seed))
        models.append(jax.device_put(state, sharding.param_shardings(state, mesh)))
    run = Run(cfg=None, method=None, workdir=None, mesh=mesh, tokenizer=None, tokens=None, model_config=mc,
              graphdef=graphdef, data=None, ckpt=None, store=store, writer=None)
    return run, models


def _leaves(params):
    return jax.tree.leaves(params)


def _seqs():
    ids, mask = random_batch(12, 16, TINY_LLAMA["vocab_size"], seed=3)
    resp = mask * (np.arange(16)[None] >= 10)
    return {"input_ids": ids, "attention_mask": mask, "response_mask": resp.astype(np.int32)}


def test_scored_models_are_held_in_bf16_on_their_shardings():
    run, (p0, p1, p2) = _run("bfloat16", "float32")
    assert {x.dtype for x in _leaves(p0)} == {jnp.dtype(jnp.float32)}
    run.models["policy"] = p0
    run.keep_resident("m0", p0)
    assert run.models["m0"] is p0  # still to be trained (SFT starts from M0)
    run.models["policy"] = p1
    run.keep_resident("m1", p1)
    assert run.models["m1"] is p1  # the policy M1: trained, float32
    m0 = run.models["m0"]
    assert {x.dtype for x in _leaves(m0)} == {jnp.dtype(jnp.bfloat16)}
    assert [x.sharding for x in _leaves(m0)] == [x.sharding for x in _leaves(p0)]
    for got, master in zip(_leaves(m0), _leaves(p0)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(master.astype(jnp.bfloat16)))
    run.models["policy"] = p2
    run.keep_resident("m2", p2)  # iteration 2: M0 and M_{t-1} = M1 scored, M2 trained
    assert sorted(run.models) == ["m0", "m1", "m2", "policy"] and run.models["m2"] is p2
    assert {x.dtype for x in _leaves(run.models["m1"])} == {jnp.dtype(jnp.bfloat16)}
    assert [x.sharding for x in _leaves(run.models["m1"])] == [x.sharding for x in _leaves(p1)]

    # Their scores are the float32 masters' scores: the forward casts the masters to bf16 itself.
    seqs = _seqs()
    for name, master in (("m0", p0), ("m1", p1)):
        got_logp, got_n = score_sequences(run.model(run.models[name]), seqs, batch_size=8)
        want_logp, want_n = score_sequences(run.model(master), seqs, batch_size=8)
        np.testing.assert_array_equal(got_n, want_n)
        np.testing.assert_allclose(got_logp, want_logp, rtol=1e-2, atol=1e-2)


def test_scored_models_read_from_disk_come_back_in_bf16(tmp_path):
    """Run.keep_models_resident = False: M_{t-1} / M0 are read from the store straight into bf16."""
    run, (p0, p1, _) = _run("bfloat16", "float32", store=checkpoint.ModelStore(tmp_path / "models"))
    run.store.save("m0", p0)
    run.store.wait()
    run.models["policy"] = p1
    m0 = run.get_model("m0")
    assert {x.dtype for x in _leaves(m0)} == {jnp.dtype(jnp.bfloat16)}
    assert [x.sharding for x in _leaves(m0)] == [x.sharding for x in _leaves(p0)]
    for got, master in zip(_leaves(m0), _leaves(p0)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(master.astype(jnp.bfloat16)))
    run.store.close()


@pytest.mark.parametrize("dtype,param_dtype", [("float32", "float32"), ("bfloat16", "bfloat16")])
def test_same_dtypes_keep_the_models_as_they_are(dtype, param_dtype):
    run, (p0, p1, _) = _run(dtype, param_dtype)
    run.keep_resident("m0", p0)
    run.keep_resident("m1", p1)
    assert run.models["m0"] is p0 and run.models["m1"] is p1
