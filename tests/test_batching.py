"""The one batching path: buckets, per-process placement, and the phase programs on 8 fake devices.

For each phase program (generate, scoring, judge read-out, train step) the compiled per-device
FLOPs with the global batch split over data=8 are ~1/8 of the same batch on one device, and the
results equal the one-device results.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cream_jax import sampling, scoring, sharding, steps
from cream_jax.config import OptimConfig
from cream_jax.engine import batching, programs
from cream_jax.models.llama import LlamaConfig
from tests._tiny_models import TINY_LLAMA, random_batch, random_llama
from tests.test_steps import pair_batch

CFG = LlamaConfig.from_hf(TINY_LLAMA)
TOL = 1e-4
# Per-device FLOPs on 8 devices over those on 1, for the same global batch: 1/8 plus what every
# device repeats (the sampling loop's scalar bookkeeping, the replicated optimizer update).
MAX_FLOP_RATIO = 1 / 8 * 1.25


def meshes():
    return sharding.single_device_mesh(), sharding.make_mesh(data=8)


def flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


@pytest.fixture(scope="module")
def model():
    return random_llama(CFG, seed=3)


def placed(model, mesh):
    graphdef, state = nnx.split(model)
    return graphdef, sharding.shard_params(state, mesh)


def test_bucket_rows_pads_only_to_the_mesh_bucket():
    _, mesh8 = meshes()
    assert [batching.bucket_rows(n, mesh8, power_of_two=False) for n in (1, 8, 9, 17)] == [8, 8, 16, 24]
    assert [batching.bucket_rows(n, mesh8) for n in (1, 9, 17, 33, 64)] == [8, 16, 32, 64, 64]
    assert batching.bucket_rows(10, sharding.single_device_mesh()) == 16
    assert batching.bucket_rows(10, sharding.single_device_mesh(), power_of_two=False) == 10
    with pytest.raises(ValueError, match="bucket_rows: need at least one row"):
        batching.bucket_rows(0, mesh8)


def test_pad_place_unpad_roundtrip_is_sharded_and_exact():
    _, mesh8 = meshes()
    x = np.arange(10 * 3, dtype=np.int32).reshape(10, 3)
    padded = batching.pad_rows({"x": x, "s": np.float32(2.0)}, 16)
    np.testing.assert_array_equal(padded["x"][10:], np.repeat(x[-1:], 6, axis=0))  # a real row repeated
    glob = batching.to_global(padded, mesh8)
    assert glob["x"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    assert glob["x"].addressable_shards[0].data.shape == (2, 3)
    assert glob["s"].sharding.is_fully_replicated
    back = batching.to_host(glob, 10)
    np.testing.assert_array_equal(back["x"], x)
    assert float(back["s"]) == 2.0
    with pytest.raises(ValueError, match="to_global: 10 rows are not a multiple of data\\*fsdp=8"):
        batching.to_global({"x": x}, mesh8)


def test_map_batched_pads_the_last_chunk_to_its_bucket_only():
    _, mesh8 = meshes()
    seen = []

    def fn(x):
        seen.append(x.shape[0])
        return x * 2

    x = np.arange(42, dtype=np.int32)
    out = batching.map_batched(fn, [x], mesh8, batch_size=32)
    np.testing.assert_array_equal(out, x * 2)
    assert seen == [32, 16]  # 42 = 32 + 10 rows; the 10 run as 16, not 32


def test_score_program_is_data_parallel(model):
    ids, mask = random_batch(16, 24, CFG.vocab_size, seed=5, left_pad=True, min_len=8)
    rmask = mask * (np.arange(24) >= 12)
    ref_sum, ref_n = scoring.sequence_logprobs(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(rmask))
    results, costs = [], []
    for mesh in meshes():
        graphdef, state = placed(model, mesh)
        program = programs.make_score_program(graphdef, state, mesh)
        args = batching.to_global([ids, mask, rmask], mesh)
        costs.append(flops(program.lower(state, *args).compile()))
        out = program(state, *args)
        assert out[0].sharding.is_equivalent_to(sharding.batch_sharding(mesh, 1), 1)
        results.append(batching.to_host(out))
    assert costs[1] / costs[0] < MAX_FLOP_RATIO, costs
    for got_sum, got_n in results:
        np.testing.assert_allclose(got_sum, np.asarray(ref_sum), rtol=TOL, atol=TOL)
        np.testing.assert_array_equal(got_n, np.asarray(ref_n))


def test_expected_judge_program_is_data_parallel(model):
    ids, mask = random_batch(16, 20, CFG.vocab_size, seed=6, left_pad=True, min_len=4)
    digits = jnp.arange(10, 16, dtype=jnp.int32)
    logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))[:, -1]
    p = np.exp(logits[:, 10:16] - logits[:, 10:16].max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ np.arange(6)
    costs = []
    for mesh in meshes():
        graphdef, state = placed(model, mesh)
        program = programs.make_expected_judge_program(graphdef, state, mesh)
        args = batching.to_global([ids, mask], mesh)
        costs.append(flops(program.lower(state, *args, digits).compile()))
        np.testing.assert_allclose(batching.to_host(program(state, *args, digits)), want, rtol=TOL, atol=TOL)
    assert costs[1] / costs[0] < MAX_FLOP_RATIO, costs


@pytest.mark.parametrize("greedy, layers", [(True, "unroll"), (False, "unroll"), (False, "scan")])
def test_generate_program_is_data_parallel(model, greedy, layers):
    ids, mask = random_batch(8, 10, CFG.vocab_size, seed=7, left_pad=True, min_len=3)
    kw = dict(num_samples=2, max_new_tokens=6, eos_ids=(2,), pad_id=0, layers=layers)
    key = jax.random.key(4)
    temperature, top_p = jnp.float32(1.0), jnp.float32(1.0)
    ref = sampling.generate(model, ids, mask, key=key, temperature=0.0 if greedy else 1.0, **{
        "num_samples": 2, "max_new_tokens": 6, "eos_id": 2, "pad_id": 0})
    costs = []
    for mesh in meshes():
        graphdef, state = placed(model, mesh)
        program = programs.make_generate_program(graphdef, state, mesh, greedy=greedy, **kw)
        args = batching.to_global([ids, mask], mesh)
        costs.append(flops(program.lower(state, *args, key, temperature, top_p).compile()))
        tokens, tmask = batching.to_host(program(state, *args, key, temperature, top_p))
        # Sampled rows too: the threefry bits do not depend on how the rows are split.
        np.testing.assert_array_equal(tokens, np.asarray(ref[0]))
        np.testing.assert_array_equal(tmask, np.asarray(ref[1]))
    assert costs[1] / costs[0] < MAX_FLOP_RATIO, costs


def test_train_step_is_data_parallel(model):
    batch = pair_batch(16, length=24)
    optim = OptimConfig(learning_rate=1e-2, batch_size=16, eps=1e-3)
    optimizer = steps.make_optimizer(optim)
    results, costs = [], []
    for mesh in meshes():
        graphdef, state = placed(model, mesh)
        train_state = steps.init_train_state(state, optimizer, jax.random.key(0))
        step = steps.make_train_step(steps.make_dpo_loss(beta=0.1), graphdef, optimizer, mesh,
                                     steps.state_shardings(train_state))
        glob = batching.to_global({**batch, "lr": np.float32(optim.learning_rate)}, mesh)
        costs.append(flops(step.lower(train_state, dict(glob)).compile()))
        new_state, metrics = step(train_state, dict(glob))
        results.append((jax.device_get(metrics["loss"]), jax.device_get(new_state["params"])))
    assert costs[1] / costs[0] < MAX_FLOP_RATIO, costs
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_loop_host_paths_split_rows_over_the_mesh_and_equal_one_device(model):
    """What the loop runs (`engine.host`: sampling, scoring; eval and judges go through the same
    two) on a data=8 mesh: the scorer the loop jits sees row-split inputs (per-device FLOPs ~1/8),
    a 10-row batch runs as 16 rows (its mesh bucket), and the outputs equal one device's."""
    from cream_jax.engine import host

    ids, mask = random_batch(10, 24, CFG.vocab_size, seed=7, left_pad=True, min_len=8)
    seqs = {"input_ids": ids, "attention_mask": mask, "response_mask": mask * (np.arange(24) >= 12)}
    tokens = host.TokenSpec(eos_ids=(1,), pad_id=0)
    p_ids, p_mask = random_batch(10, 12, CFG.vocab_size, seed=8, left_pad=True, min_len=4)
    outs, costs = [], []
    for mesh in meshes():
        graphdef, state = placed(model, mesh)
        on_mesh = nnx.merge(graphdef, state)
        assert host.mesh_of(on_mesh).devices.size == mesh.devices.size
        args = batching.to_global(batching.pad_rows([seqs[k] for k in seqs], 16), mesh)
        costs.append(flops(scoring._scorer(graphdef).lower(state, *args).compile()))
        logp, n_tok = host.score_sequences(on_mesh, seqs, batch_size=64)
        toks, tmask = host.sample_responses(on_mesh, p_ids, p_mask, key=jax.random.key(0), num_samples=2,
                                            max_new_tokens=4, temperature=0.0, top_p=1.0, top_k=0, tokens=tokens,
                                            batch_size=64)
        assert logp.shape == (10,) and toks.shape == (10, 2, 4)
        outs.append((logp, n_tok, toks, tmask))
    assert costs[1] / costs[0] < MAX_FLOP_RATIO, costs
    np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=TOL, atol=TOL)
    for a, b in zip(outs[1][1:], outs[0][1:]):
        np.testing.assert_array_equal(a, b)
