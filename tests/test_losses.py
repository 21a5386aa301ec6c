"""cream_jax.losses against NumPy transcriptions of METHODS.md, torch cross-entropy and TRL's loss code."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cream_jax.losses import consistency_dpo_loss, dpo_loss, dpo_metrics, scir_loss, sft_loss

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.cpo import CPOTrainer  # noqa: E402  (after the env var that silences its warning)

B = 16


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.fixture
def logps():
    rng = np.random.default_rng(0)
    c, r, rc, rr = (rng.normal(-40.0, 15.0, size=B).astype(np.float32) for _ in range(4))
    lc, lr = (rng.integers(1, 60, size=B).astype(np.float32) for _ in range(2))
    return c, r, rc, rr, lc, lr


def trl_cpo_loss(policy_chosen, policy_rejected, *, loss_type, beta, label_smoothing=0.0, simpo_gamma=0.5):
    """TRL's own loss lines (CPOTrainer.cpo_loss, trl 1.16), called unbound with the attributes it reads.

    TRL 1.16's DPOTrainer computes its losses inline in ``_compute_loss`` (not callable without a model)
    and its "sigmoid" branch has no label smoothing; CPOTrainer.cpo_loss holds the conservative-DPO
    (label-smoothed sigmoid), IPO, hinge and SimPO formulas on a "logits" difference. Fed the policy /
    reference log-ratios, its sigmoid/ipo/hinge equal DPO's; fed average log-probs, its simpo is SimPO.
    """
    fake = types.SimpleNamespace(
        alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
        accelerator=types.SimpleNamespace(device="cpu"),
    )
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(
        fake, torch.tensor(np.asarray(policy_chosen, np.float64)), torch.tensor(np.asarray(policy_rejected, np.float64))
    )
    return losses.numpy(), chosen_rewards.numpy(), rejected_rewards.numpy()


def test_sft_loss_matches_torch_cross_entropy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
    ids = rng.integers(0, 11, size=(3, 7))
    mask = np.zeros((3, 7), bool)
    mask[0, 3:6] = True
    mask[1, 1:] = True
    # row 2 has no targets
    loss, n = sft_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    labels = torch.tensor(np.where(mask, ids, -100))[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        torch.tensor(logits[:, :-1]).reshape(-1, 11), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).reshape(3, 6)
    want_n = (labels != -100).sum(1).numpy()
    want = nll.sum(1).numpy() / np.maximum(want_n, 1)
    np.testing.assert_allclose(np.asarray(n), want_n)
    np.testing.assert_allclose(np.asarray(loss), want, atol=1e-5, rtol=1e-5)
    assert float(loss[2]) == 0.0


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.35])
def test_dpo_sigmoid_matches_trl(logps, label_smoothing):
    c, r, rc, rr, _, _ = logps
    got = dpo_loss(c, r, rc, rr, beta=0.1, label_smoothing=label_smoothing)
    want, _, _ = trl_cpo_loss(c - rc, r - rr, loss_type="sigmoid", beta=0.1, label_smoothing=label_smoothing)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    # METHODS 1 soft-label form with c = 1 - eps, written out in NumPy.
    d = 0.1 * ((c - rc) - (r - rr))
    ref = -(1 - label_smoothing) * log_sigmoid(d) - label_smoothing * log_sigmoid(-d)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_dpo_ipo_hinge_match_trl(logps, loss_type):
    c, r, rc, rr, _, _ = logps
    got = dpo_loss(c, r, rc, rr, beta=0.3, loss_type=loss_type)
    want, _, _ = trl_cpo_loss(c - rc, r - rr, loss_type=loss_type, beta=0.3)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_ipo_length_normalised_matches_trl_dpo_formula(logps):
    c, r, rc, rr, lc, lr = logps
    got = dpo_loss(c, r, rc, rr, beta=0.3, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr)
    # trl 1.16 DPOTrainer._compute_loss, loss_type == "ipo" (transcribed: the method needs a model).
    ipo_delta = (c - rc) / np.maximum(lc, 1) - (r - rr) / np.maximum(lr, 1)
    np.testing.assert_allclose(np.asarray(got), (ipo_delta - 1 / (2 * 0.3)) ** 2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_matches_trl(logps, label_smoothing):
    c, r, _, _, lc, lr = logps
    got = dpo_loss(c, r, beta=2.0, loss_type="simpo", chosen_lengths=lc, rejected_lengths=lr, simpo_gamma=0.7,
                   label_smoothing=label_smoothing)
    want, _, _ = trl_cpo_loss(c / lc, r / lr, loss_type="simpo", beta=2.0, simpo_gamma=0.7,
                              label_smoothing=label_smoothing)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_dpo_metrics_match_trl_rewards(logps):
    c, r, rc, rr, lc, lr = logps
    m = dpo_metrics(c, r, rc, rr, beta=0.1)
    _, rew_c, rew_r = trl_cpo_loss(c - rc, r - rr, loss_type="sigmoid", beta=0.1)
    np.testing.assert_allclose(float(m["rewards/chosen"]), rew_c.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["rewards/rejected"]), rew_r.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["rewards/margins"]), (rew_c - rew_r).mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["rewards/accuracies"]), (rew_c > rew_r).mean())
    np.testing.assert_allclose(float(m["logps/chosen"]), c.mean(), rtol=1e-5)
    ms = dpo_metrics(c, r, beta=2.0, loss_type="simpo", chosen_lengths=lc, rejected_lengths=lr)
    _, rew_c, _ = trl_cpo_loss(c / lc, r / lr, loss_type="simpo", beta=2.0)
    np.testing.assert_allclose(float(ms["rewards/chosen"]), rew_c.mean(), rtol=1e-5)


def test_dpo_is_log2_when_policy_is_reference(logps):
    c, r, _, _, _, _ = logps
    for eps in (0.0, 0.3):
        np.testing.assert_allclose(np.asarray(dpo_loss(c, r, c, r, label_smoothing=eps)), np.log(2.0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(consistency_dpo_loss(c, r, c, r, np.full(B, 0.8))), np.log(2.0), atol=1e-6)


def test_consistency_dpo_identities(logps):
    c, r, rc, rr, _, _ = logps
    cons = np.random.default_rng(2).uniform(size=B).astype(np.float32)
    got = np.asarray(consistency_dpo_loss(c, r, rc, rr, cons, beta=0.1))
    d = 0.1 * ((c - rc) - (r - rr))
    np.testing.assert_allclose(got, cons * -log_sigmoid(d) + (1 - cons) * -log_sigmoid(-d), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got, np.asarray(dpo_loss(c, r, rc, rr, label_smoothing=1 - cons)), atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(consistency_dpo_loss(c, r, rc, rr, 1.0)), np.asarray(dpo_loss(c, r, rc, rr)), atol=1e-6
    )
    # C = 0: plain DPO on the reversed pair (D_RDPO).
    np.testing.assert_allclose(
        np.asarray(consistency_dpo_loss(c, r, rc, rr, 0.0)), np.asarray(dpo_loss(r, c, rr, rc)), atol=1e-5
    )


def _scir_reference(l1, l2, r1, r2, pg, beta, alpha, gamma, divergence):
    """METHODS 5.2 written out in NumPy (float64)."""
    d = beta * ((l1 - r1) - (l2 - r2))
    p = sigmoid(d)
    agree = (p > 0.5) & (pg > 0.5) | (p < 0.5) & (pg < 0.5)
    z = p > 0.5
    pref = np.where(z, -log_sigmoid(d), -log_sigmoid(-d))
    l_pref = pref[agree].mean() if agree.any() else 0.0
    kl = lambda a, b: a * np.log(a / b) + (1 - a) * np.log((1 - a) / (1 - b))  # noqa: E731
    cons = {
        "skl": kl(p, pg) + kl(pg, p),
        "bce": -(pg * np.log(p) + (1 - pg) * np.log(1 - p)),
        "mse": (p - pg) ** 2,
    }[divergence]
    ent = lambda a: -(a * np.log(a) + (1 - a) * np.log(1 - a))  # noqa: E731
    return l_pref + alpha * cons.mean() + gamma * (ent(p) + ent(pg)).mean(), agree.mean()


@pytest.mark.parametrize("divergence", ["skl", "bce", "mse"])
def test_scir_matches_reference(logps, divergence):
    c, r, rc, rr, _, _ = logps
    pg = np.random.default_rng(3).uniform(0.05, 0.95, size=B).astype(np.float32)
    losses, metrics = scir_loss(c, r, rc, rr, pg, beta=0.05, alpha=0.7, gamma=0.2, divergence=divergence)
    want, agreement = _scir_reference(*(a.astype(np.float64) for a in (c, r, rc, rr, pg)), 0.05, 0.7, 0.2, divergence)
    np.testing.assert_allclose(float(jnp.mean(losses)), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["scir/agreement"]), agreement)
    assert 0 < agreement < 1  # the fixture exercises both branches


def test_scir_weights_ignore_padding_rows(logps):
    c, r, rc, rr, _, _ = logps
    pg = np.random.default_rng(4).uniform(0.05, 0.95, size=B).astype(np.float32)
    losses, metrics = scir_loss(c, r, rc, rr, pg, gamma=0.3)
    pad = lambda a, v: np.concatenate([a, np.full(5, v, np.float32)])  # noqa: E731
    w = pad(np.ones(B, np.float32), 0.0)
    # Padding rows that would agree (Delta > 0, p_gen > 1/2) must not count.
    padded, pm = scir_loss(pad(c, 0.0), pad(r, -50.0), pad(rc, 0.0), pad(rr, 0.0), pad(pg, 0.9), gamma=0.3, weight=w)
    np.testing.assert_allclose(float(jnp.sum(w * padded) / w.sum()), float(jnp.mean(losses)), rtol=1e-5)
    for k in metrics:
        np.testing.assert_allclose(float(pm[k]), float(metrics[k]), rtol=1e-5, err_msg=k)


def test_scir_no_agreement_when_policy_is_reference(logps):
    c, r, _, _, _, _ = logps
    pg = np.linspace(0.1, 0.9, B).astype(np.float32)
    losses, metrics = scir_loss(c, r, c, r, pg, alpha=0.0, gamma=0.0)
    assert float(metrics["scir/agreement"]) == 0.0
    np.testing.assert_allclose(np.asarray(losses), 0.0)


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_gradients_finite_for_extreme_inputs(scale):
    c = jnp.full((4,), scale)
    z = jnp.zeros((4,))
    lens = jnp.full((4,), 3.0)
    fns = [
        lambda a: dpo_loss(a, z, z, z, label_smoothing=0.2).sum(),
        lambda a: dpo_loss(a, z, z, z, loss_type="ipo").sum(),
        lambda a: dpo_loss(a, z, z, z, loss_type="hinge").sum(),
        lambda a: dpo_loss(a, z, loss_type="simpo", chosen_lengths=lens, rejected_lengths=lens).sum(),
        lambda a: consistency_dpo_loss(a, z, z, z, jnp.full((4,), 0.7)).sum(),
    ]
    for div in ("skl", "bce", "mse"):
        fns.append(lambda a, div=div: scir_loss(a, z, z, z, jnp.array([0.0, 1.0, 0.5, 0.3]), gamma=1.0,
                                                divergence=div)[0].sum())
        fns.append(lambda a, div=div: scir_loss(z, z, z, z, jax.nn.sigmoid(a), gamma=1.0, divergence=div)[0].sum())
    # One compiled program for all of them (eager dispatch would compile every primitive).
    values, grads = jax.jit(lambda a: tuple(zip(*(jax.value_and_grad(fn)(a) for fn in fns))))(c)
    assert np.all(np.isfinite(np.asarray(values))) and np.all(np.isfinite(np.asarray(grads)))


def test_bad_input(logps):
    c, r, rc, rr, lc, lr = logps
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(c, r, rc, rr, loss_type="kto")
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(c, r, loss_type="simpo")
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_loss(c, r)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(c, r, rc, rr, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(c, r, rc, rr, label_smoothing=1.5)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(c, r[:3], rc, rr)
    with pytest.raises(ValueError, match="divergence"):
        scir_loss(c, r, rc, rr, np.full(B, 0.5), divergence="js")
    with pytest.raises(ValueError, match="sft_loss"):
        sft_loss(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 4)))


def test_compiles_once_and_maps(logps):
    c, r, rc, rr, _, _ = logps
    cons = np.full(B, 0.6, np.float32)
    traces = []

    def step(c, r, rc, rr, cons, p_gen):
        traces.append(1)  # runs only while tracing
        scir, metrics = scir_loss(c, r, rc, rr, p_gen)
        return dpo_loss(c, r, rc, rr), consistency_dpo_loss(c, r, rc, rr, cons), scir, dpo_metrics(c, r, rc, rr)

    jitted = jax.jit(step)
    jitted(c, r, rc, rr, cons, cons)
    jitted(c + 1, r, rc, rr, cons * 0.5, cons)
    assert len(traces) == 1
    # Per-pair losses map over pairs: vmap of the scalar version == the batched call.
    per_pair = jax.jit(jax.vmap(lambda *a: consistency_dpo_loss(*a)))(c, r, rc, rr, cons)
    np.testing.assert_allclose(np.asarray(per_pair), np.asarray(consistency_dpo_loss(c, r, rc, rr, cons)), atol=1e-6)
    sft_traces = []

    def sft(logits, ids, mask):
        sft_traces.append(1)
        return sft_loss(logits, ids, mask)

    sft_jit = jax.jit(sft)
    logits = jnp.zeros((2, 5, 7))
    ids = jnp.zeros((2, 5), jnp.int32)
    sft_jit(logits, ids, jnp.ones((2, 5)))
    sft_jit(logits + 1, ids + 1, jnp.zeros((2, 5)))
    assert len(sft_traces) == 1
