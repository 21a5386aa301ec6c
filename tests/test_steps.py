"""Training steps: sharded == single device, gradient accumulation, CREAM loss wiring, compile hygiene."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cream_jax import losses, scoring, sharding, steps
from cream_jax.config import OptimConfig
from cream_jax.engine import batching
from cream_jax.models.llama import LlamaConfig
from tests._tiny_models import TINY_LLAMA, random_batch, random_llama

CFG = LlamaConfig.from_hf(TINY_LLAMA)


def pair_batch(n: int, length: int = 16, seed: int = 0) -> dict:
    """Random pairs in the DPO step's layout: left-padded prompt (8) + right-padded response."""
    rng = np.random.default_rng(seed)
    out = {}
    for side in ("chosen", "rejected"):
        ids, mask = random_batch(n, length, CFG.vocab_size, seed=seed + (side == "rejected"), left_pad=False, min_len=10)
        resp = mask.copy()
        resp[:, :8] = 0
        out[f"{side}_ids"], out[f"{side}_mask"], out[f"{side}_resp"] = ids, mask, resp
    out["ref_chosen"] = rng.normal(-20, 3, n).astype(np.float32)
    out["ref_rejected"] = rng.normal(-20, 3, n).astype(np.float32)
    out["consistency"] = rng.uniform(0, 1, n).astype(np.float32)
    out["weight"] = np.ones(n, np.float32)
    out["weight"][-1] = 0.0  # a padding row must not count
    return out


def one_step(mesh, batch, *, grad_accum=1, loss_fn=None, lr=1e-2):
    model = random_llama(CFG, seed=1)
    graphdef, params = nnx.split(model)
    params = sharding.shard_params(params, mesh)
    # eps=1e-3: Adam's first update g / (|g| + eps) is ill-conditioned for |g| ~ 1e-8 (then summation
    # order alone flips it); a larger eps keeps the comparison about sharding, not about that.
    optim = OptimConfig(learning_rate=lr, grad_accum=grad_accum, batch_size=len(batch["weight"]), eps=1e-3)
    optimizer = steps.make_optimizer(optim)
    state = steps.init_train_state(params, optimizer, jax.random.key(0))
    loss_fn = loss_fn or steps.make_dpo_loss(beta=0.1)
    step = steps.make_train_step(loss_fn, graphdef, optimizer, mesh, steps.state_shardings(state), grad_accum)
    sharded = batching.to_global(batch, mesh)
    sharded["lr"] = jnp.asarray(lr, jnp.float32)
    new_state, m = step(state, sharded)
    return jax.device_get(new_state["params"]), jax.device_get(m), graphdef, params, step


def test_cream_step_on_8_devices_equals_1_device():
    batch = pair_batch(8)
    p1, m1, *_ = one_step(sharding.single_device_mesh(), batch)
    p8, m8, *_ = one_step(sharding.make_mesh(2, 2, 2), batch)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_step_loss_equals_formula_with_padding_row_excluded():
    """The step's loss is METHODS 2.3's C*DPO(y+,y-) + (1-C)*DPO(y-,y+) averaged over real pairs."""
    batch = pair_batch(4, seed=3)
    _, m, graphdef, params, _ = one_step(sharding.single_device_mesh(), batch)
    model = nnx.merge(graphdef, params)

    def logps(side):
        logits = model(jnp.asarray(batch[f"{side}_ids"]), jnp.asarray(batch[f"{side}_mask"]))
        return np.asarray(scoring.response_logprobs(logits, jnp.asarray(batch[f"{side}_ids"]), jnp.asarray(batch[f"{side}_resp"]))[0])

    delta = 0.1 * ((logps("chosen") - batch["ref_chosen"]) - (logps("rejected") - batch["ref_rejected"]))
    c = batch["consistency"]
    log_sig = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
    per_pair = -c * log_sig(delta) - (1 - c) * log_sig(-delta)
    expected = per_pair[:3].mean()
    np.testing.assert_allclose(m["loss"], expected, rtol=1e-5)
    assert np.isclose(m["consistency/weight"], c[:3].mean(), rtol=1e-6)


def test_gradient_accumulation_equals_full_batch():
    batch = pair_batch(8, seed=5)
    batch["weight"][:] = 1.0  # equal-size micro-batches: the mean of means is the mean
    p_full, m_full, *_ = one_step(sharding.single_device_mesh(), batch, grad_accum=1)
    p_acc, m_acc, *_ = one_step(sharding.single_device_mesh(), batch, grad_accum=2)
    np.testing.assert_allclose(m_acc["loss"], m_full["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves(p_acc)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_no_recompilation_for_new_learning_rate_or_values():
    batch = pair_batch(4, seed=7)
    mesh = sharding.single_device_mesh()
    _, _, graphdef, params, step = one_step(mesh, batch)
    optimizer = steps.make_optimizer(OptimConfig())
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, d, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
    )
    for i, lr in enumerate([1e-3, 5e-4, 0.0]):
        state = steps.init_train_state(params, optimizer, jax.random.key(i))
        b = batching.to_global(pair_batch(4, seed=10 + i), mesh)
        b["lr"] = jnp.asarray(lr, jnp.float32)
        state, m = step(state, b)
        jax.block_until_ready(m)
        if i == 0:
            compiles.clear()  # the first call may compile init helpers; later ones must not
    assert compiles == []


def test_zero_learning_rate_leaves_params_and_lm_loss_is_token_mean():
    ids, mask = random_batch(4, 12, CFG.vocab_size, seed=2, left_pad=False, min_len=4)
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask, "weight": np.ones(4, np.float32)}
    new_params, m, graphdef, params, _ = one_step(sharding.single_device_mesh(), batch, loss_fn=steps.lm_loss, lr=0.0)
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(jax.device_get(params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    logits = nnx.merge(graphdef, params)(jnp.asarray(ids), jnp.asarray(mask))
    per_ex, n = losses.sft_loss(logits, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(m["loss"], float(jnp.sum(per_ex * n) / jnp.sum(n)), rtol=1e-5)


@pytest.mark.parametrize("total", [1, 10, 100])
def test_learning_rate_schedule_warmup_then_cosine(total):
    optim = OptimConfig(learning_rate=1.0, warmup_ratio=0.1, end_lr_ratio=0.0)
    lrs = [steps.learning_rate(optim, s, total) for s in range(total)]
    assert all(0.0 <= lr <= 1.0 for lr in lrs)
    assert lrs[0] > 0.0
    warm = int(round(0.1 * total))
    if warm > 1:
        assert lrs[warm - 1] == pytest.approx(1.0)
        assert all(a <= b + 1e-9 for a, b in zip(lrs[:warm - 1], lrs[1:warm]))
    assert all(a >= b - 1e-9 for a, b in zip(lrs[warm:], lrs[warm + 1:]))


# ------------------------------------------------------------------------------------------
# Mixed precision (float32 master weights, bf16 compute) and remat.


def _dpo_step(config, params, graphdef_model, batch, *, lr, remat=None, mesh=None, eps=1e-8):
    """One DPO step from ``params``; returns (loss, new params on the host, the compiled step)."""
    mesh = mesh or sharding.single_device_mesh()
    graphdef, _ = nnx.split(graphdef_model)
    params = sharding.shard_params(params, mesh)
    optimizer = steps.make_optimizer(OptimConfig(learning_rate=lr, batch_size=len(batch["weight"]), eps=eps))
    state = steps.init_train_state(params, optimizer, jax.random.key(0))
    step = steps.make_train_step(steps.make_dpo_loss(beta=0.1), graphdef, optimizer, mesh,
                                 steps.state_shardings(state), remat=remat)
    glob = {**batching.to_global(batch, mesh), "lr": jnp.asarray(lr, jnp.float32)}
    compiled = step.lower(state, dict(glob)).compile()
    new_state, metrics = step(state, glob)
    return float(metrics["loss"]), jax.device_get(new_state["params"]), compiled


def _changed_fraction(before, after) -> float:
    """Fraction of the entries of every parameter but the embedding (rows of unseen tokens get no
    gradient) that a step changed."""
    flat_b, flat_a = dict(nnx.to_flat_state(before)), dict(nnx.to_flat_state(after))
    changed = total = 0
    for path, var in flat_b.items():
        if path == ("embed",):
            continue
        b, a = np.asarray(var.get_value(), np.float32), np.asarray(flat_a[path].get_value(), np.float32)
        changed += int(np.sum(a != b))
        total += a.size
    return changed / total


def test_fp32_master_weights_learn_at_lr_1e6_where_bf16_weights_do_not():
    import dataclasses  # noqa: PLC0415

    batch = pair_batch(8)
    base = random_llama(CFG, seed=2, std=0.02)  # N(0, 0.02) weights, as at init
    _, params32 = nnx.split(base)
    loss32, new32, _ = _dpo_step(CFG, params32, base, batch, lr=1e-6)
    # fp32 master + bf16 compute: same float32 params, the forward casts them per layer.
    mixed_cfg = dataclasses.replace(CFG, dtype="bfloat16", param_dtype="float32")
    mixed = random_llama(mixed_cfg, seed=2, std=0.02)
    _, params_mixed = nnx.split(mixed)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params_mixed))
    loss_mixed, new_mixed, _ = _dpo_step(mixed_cfg, params_mixed, mixed, batch, lr=1e-6)
    # All-bf16 params (the old preset): the same step mostly rounds away.
    bf16_cfg = dataclasses.replace(CFG, dtype="bfloat16")
    bf16 = random_llama(bf16_cfg, seed=2, std=0.02)
    _, params16 = nnx.split(bf16)
    _, new16, _ = _dpo_step(bf16_cfg, params16, bf16, batch, lr=1e-6)

    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_mixed))  # the update stays fp32
    assert _changed_fraction(params_mixed, new_mixed) > 0.9
    assert _changed_fraction(params16, new16) < 0.1
    # bf16 compute of summed response log-probs (~12 tokens) moves the DPO loss (~log 2) by well
    # under 1e-2; float32 logits and log-softmax keep it there.
    np.testing.assert_allclose(loss_mixed, loss32, atol=1e-2)


def test_remat_lowers_train_step_temp_memory_with_the_same_loss_and_update():
    cfg = LlamaConfig.from_hf({**TINY_LLAMA, "num_hidden_layers": 4})
    model = random_llama(cfg, seed=5, std=0.1)
    _, params = nnx.split(model)
    batch = pair_batch(8, length=64)
    # eps=1e-3 keeps Adam's first update g / (|g| + eps) well-conditioned (see one_step), so the
    # updates compare the gradients, not the summation order of near-zero ones.
    runs = {mode: _dpo_step(cfg, params, model, batch, lr=1e-3, remat=mode, eps=1e-3)
            for mode in ("none", "matmuls", "full")}
    temp = {mode: run[2].memory_analysis().temp_size_in_bytes for mode, run in runs.items()}
    assert temp["full"] < temp["matmuls"] < temp["none"], temp
    for mode in ("matmuls", "full"):
        np.testing.assert_allclose(runs[mode][0], runs["none"][0], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(runs[mode][1]), jax.tree.leaves(runs["none"][1])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="Llama.remat: must be a bool or one of"):
        steps.make_train_step(steps.make_dpo_loss(beta=0.1), None, None, None, None, remat="some")
