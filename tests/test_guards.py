"""cream_jax.guards.param_norm and checkpoint.is_finite_tree: right values on sharded trees, and one
program per tree structure (not one eager reduction per leaf: the multi-process deadlock they fix)."""

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
