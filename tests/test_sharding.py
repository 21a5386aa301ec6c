"""8 fake devices on a (data=2, fsdp=2, tensor=2) mesh give the single-device results (STYLE.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from cream_jax import sampling, scoring, sharding
from cream_jax.engine import batching
from cream_jax.models.hf import load_hf_llama
from tests._tiny_models import random_batch, save_tiny_llama
from tests.test_llama import forward

TOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    assert len(jax.devices()) == 8
    path = str(tmp_path_factory.mktemp("tiny_shard"))
    save_tiny_llama(path, seed=8, attention_bias=True)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    single, _ = load_hf_llama(path)
    sharded, cfg = load_hf_llama(path, mesh=mesh)
    return single, sharded, cfg, mesh


def test_load_places_params_by_logical_names(models):
    single, sharded, cfg, mesh = models
    state = nnx.state(sharded, nnx.Param)
    assert sharding.unnamed_params(state) == []
    expected = {
        ("embed",): P("tensor", "fsdp"),
        ("lm_head",): P("fsdp", "tensor"),
        ("layers", "attn", "wq"): P(None, "fsdp", "tensor", None),
        ("layers", "attn", "wk"): P(None, "fsdp", "tensor", None),
        ("layers", "attn", "wo"): P(None, "tensor", None, "fsdp"),
        ("layers", "attn", "bq"): P(None, "tensor", None),
        ("layers", "mlp", "w_gate"): P(None, "fsdp", "tensor"),
        ("layers", "mlp", "w_down"): P(None, "tensor", "fsdp"),
        ("layers", "input_norm"): P(None, None),
        ("final_norm",): P(None),
    }
    flat = dict(nnx.to_flat_state(state))
    for path, spec in expected.items():
        value = flat[path][...]
        assert value.sharding.mesh.shape == mesh.shape, path
        assert value.sharding.spec == spec, (path, value.sharding.spec)
    wq = flat[("layers", "attn", "wq")][...]
    assert len(wq.sharding.device_set) == 8
    assert wq.addressable_shards[0].data.shape == (cfg.num_hidden_layers, cfg.hidden_size // 2,
                                                   cfg.num_attention_heads // 2, cfg.head_dim)
    # Same values as the single-device load.
    for path, var in nnx.to_flat_state(nnx.state(single, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(flat[path][...]), np.asarray(var[...]), err_msg=str(path))


def test_sharded_forward_and_scoring_equal_single_device(models):
    single, sharded, cfg, mesh = models
    ids, mask = random_batch(8, 10, cfg.vocab_size, seed=12, left_pad=True, min_len=3)
    rmask = np.zeros_like(mask)
    rmask[:, 6:] = 1
    batch = batching.to_global({"ids": ids, "mask": mask, "rmask": rmask}, mesh)
    assert batch["ids"].sharding.spec == P(("data", "fsdp"), None)
    ref = np.asarray(forward(single, ids, mask))
    got = forward(sharded, batch["ids"], batch["mask"])
    np.testing.assert_allclose(np.asarray(got), ref, atol=TOL, rtol=TOL)

    ref_sum, ref_n = scoring.sequence_logprobs(single, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(rmask))
    got_sum, got_n = scoring.sequence_logprobs(sharded, batch["ids"], batch["mask"], batch["rmask"])
    np.testing.assert_allclose(np.asarray(got_sum), np.asarray(ref_sum), atol=TOL, rtol=TOL)
    np.testing.assert_array_equal(np.asarray(got_n), np.asarray(ref_n))


def test_sharded_greedy_generate_equals_single_device(models):
    single, sharded, cfg, mesh = models
    ids, mask = random_batch(4, 6, cfg.vocab_size, seed=13, left_pad=True, min_len=2)
    kw = dict(key=jax.random.key(0), num_samples=2, max_new_tokens=8, temperature=0.0, eos_id=2, pad_id=0)
    ref_tok, ref_mask = sampling.generate(single, ids, mask, **kw)
    batch = batching.to_global({"ids": ids, "mask": mask}, mesh)
    got_tok, got_mask = sampling.generate(sharded, batch["ids"], batch["mask"], **kw)
    np.testing.assert_array_equal(np.asarray(got_tok), np.asarray(ref_tok))
    np.testing.assert_array_equal(np.asarray(got_mask), np.asarray(ref_mask))


def test_create_sharded_builds_the_eager_values_on_the_mesh():
    from cream_jax.models.llama import Llama, LlamaConfig  # noqa: PLC0415

    mc = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=32)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    _, eager = nnx.split(Llama(mc, rngs=nnx.Rngs(3)))
    graphdef, state = sharding.create_sharded(lambda: Llama(mc, rngs=nnx.Rngs(3)), mesh)
    expected = sharding.param_shardings(eager, mesh)
    flat_eager, flat_state = nnx.to_flat_state(eager), nnx.to_flat_state(state)
    assert [p for p, _ in flat_eager] == [p for p, _ in flat_state]
    for (path, a), (_, b) in zip(flat_eager, flat_state, strict=True):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    leaves_expected = jax.tree.leaves(expected)
    leaves_state = jax.tree.leaves(state)
    assert len(leaves_expected) == len(leaves_state)
    for want, got in zip(leaves_expected, leaves_state, strict=True):
        assert got.sharding.is_equivalent_to(want, got.ndim)
    assert any(not s.sharding.is_fully_replicated for s in leaves_state)  # the big matrices are split
    assert isinstance(nnx.merge(graphdef, state), Llama)
