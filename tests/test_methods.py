"""The method protocol's pieces, against hand computations: which models each method scores, the
implicit rewards, the log-prob table, the methods' selections, SCIR's EFT pairs and step-1 tie,
and the preference loader's exact epochs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cream_jax import config as config_lib, losses, methods, preference
from cream_jax.loop import curate
from cream_jax.loop.logprobs import LogProbTable
from cream_jax.loop.trainer import PAD, epoch_order
from cream_jax.methods.base import implicit_models, implicit_rewards
from cream_jax.methods.scir import pairwise_eft_chats


def method(name, **sections):
    cfg = dataclasses.replace(config_lib.RunConfig(method=name), **sections)
    return methods.create(cfg)


@pytest.mark.parametrize("reference, t, want", [
    ("initial", 1, {1, 0}),        # M1 vs M0; M0's own ranking is its likelihood
    ("initial", 2, {2, 1, 0}),     # M2 - M0 now, M1 - M0 before: 3 forwards, not 4
    ("initial", 3, {3, 2, 0}),
    ("previous", 1, {1, 0}),
    ("previous", 2, {2, 1, 0}),    # M2 - M1 now, M1 - M0 before
    ("previous", 3, {3, 2, 1}),
])
def test_implicit_methods_score_exactly_the_models_their_rewards_use(reference, t, want):
    reward = config_lib.RewardConfig(reward_reference=reference)
    for name in ("cream", "sera", "scir"):
        assert method(name, reward=reward).models_to_score(t) == frozenset(want)
    # SRLM ranks with its judge, the oracle with the verifier: only M_t (the DPO reference) is scored.
    for name in ("srlm", "dpo_oracle"):
        assert method(name, reward=reward).models_to_score(t) == frozenset({t})
    assert implicit_models(t, reference) == frozenset(want)


class FakeTable(dict):
    def __init__(self, logps, n_tokens):
        super().__init__(logps)
        self.n_tokens = n_tokens


def test_implicit_rewards_by_hand():
    lp = {k: np.array([[-1.0 - k, -2.0 * (k + 1)]], np.float32) for k in range(4)}
    n = np.array([[2.0, 4.0]], np.float32)
    now, prev = implicit_rewards(1, FakeTable(lp, n), "initial")
    np.testing.assert_allclose(now, lp[1] - lp[0])
    np.testing.assert_allclose(prev, lp[0] / n)  # M0: length-normalised likelihood
    now, prev = implicit_rewards(3, FakeTable(lp, n), "initial")
    np.testing.assert_allclose(now, lp[3] - lp[0])
    np.testing.assert_allclose(prev, lp[2] - lp[0])
    now, prev = implicit_rewards(3, FakeTable(lp, n), "previous")
    np.testing.assert_allclose(now, lp[3] - lp[2])
    np.testing.assert_allclose(prev, lp[2] - lp[1])


def test_log_prob_table_scores_each_named_model_once_and_refuses_others():
    from cream_jax.engine.host import score_sequences
    from cream_jax.models.llama import LlamaConfig
    from tests._tiny_models import TINY_LLAMA, random_llama

    config = LlamaConfig.from_hf(TINY_LLAMA)
    models = {k: random_llama(config, seed=k) for k in range(3)}
    loads = []

    def model(k):
        loads.append(k)
        return models[k]

    rng = np.random.default_rng(0)
    b, r, t = 2, 3, 12
    ids = rng.integers(4, 100, size=(b * r, t)).astype(np.int32)
    seqs = {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "response_mask": (np.arange(t) >= 5).astype(np.int32)[None].repeat(b * r, 0)}
    table = LogProbTable(seqs, (b, r), model, batch_size=4).score({2, 0}).score({0})
    assert loads == [2, 0] and table.scored == {0, 2}
    for k in (0, 2):
        want, n_tok = score_sequences(models[k], seqs, 4)
        np.testing.assert_allclose(table[k], np.asarray(want).reshape(b, r), rtol=1e-6)
    np.testing.assert_array_equal(table.n_tokens, np.full((b, r), t - 5))
    with pytest.raises(KeyError, match="M1 did not score the rollout"):
        table[1]


def rollout_stub(tokens):
    tokens = np.asarray(tokens)

    class R:
        pass

    ro = R()
    ro.tokens, ro.token_mask, ro.valid = tokens, np.ones_like(tokens), np.ones(tokens.shape[:2], bool)
    return ro


def test_cream_weights_by_consistency_and_sera_keeps_the_top_margins():
    r_now = np.array([[0.0, 3.0, 1.0], [0.0, 0.5, 0.2], [2.0, 2.0, 2.0], [5.0, 0.0, 1.0]], np.float32)
    ro = rollout_stub(np.arange(12).reshape(4, 3, 1))
    pairs = curate.build_pairs(r_now, ro.valid, ro.tokens, ro.token_mask)
    rewards = methods.Rewards(current=r_now, previous=r_now)
    c = np.array([0.9, 0.2, 0.5, 0.7], np.float32)
    sel = method("cream").select(None, ro, rewards, pairs, c)
    np.testing.assert_array_equal(sel.weight, c)
    np.testing.assert_array_equal(np.asarray(sel.pairs.keep), [True, True, False, True])  # prompt 2 tied

    sel = method("sera", sera=config_lib.SeRAConfig(ratio=0.5)).select(None, ro, rewards, pairs, c)
    # margins 3.0, 0.5, -, 5.0: round(0.5 * 3) = 2 kept, the largest; the third is "unselected"
    np.testing.assert_array_equal(np.asarray(sel.pairs.keep), [True, False, False, True])
    counts = {k: int(v) for k, v in sel.pairs.counts().items()}
    assert counts["pairs/dropped_unselected"] == 1 and counts["pairs/dropped_tied"] == 1
    np.testing.assert_array_equal(sel.weight, 1.0)
    boot = preference.bootstrap_pairs(jnp.asarray(r_now), ratio=0.5, response_ids=jnp.asarray(ro.tokens))
    np.testing.assert_array_equal(np.asarray(boot.status), np.asarray(sel.pairs.status))


def test_srlm_judges_with_m_t_and_m_t_minus_1_unless_its_consistency_is_off(monkeypatch):
    from cream_jax.engine import judging

    calls = []

    def fake_judge_scores(model, tokenizer, instructions, responses, **kwargs):
        calls.append(model)
        return np.full((len(responses), len(responses[0])), float(model), np.float32), 2

    monkeypatch.setattr(judging, "judge_scores", fake_judge_scores)
    ctx = type("Ctx", (), {"t": 2, "key": jax.random.key(0), "tokenizer": None, "tokens": None,
                           "model": staticmethod(lambda k: k)})()
    rollout = type("Rollout", (), {"instructions": ["q1", "q2"], "texts": [["a", "b"], ["c", "d"]]})()
    rewards = method("srlm").rewards(ctx, rollout, None)
    assert calls == [2, 1] and rewards.judge_parse_failures == 2
    np.testing.assert_array_equal(rewards.current, 2.0)
    np.testing.assert_array_equal(rewards.previous, 1.0)
    calls.clear()
    rewards = method("srlm", srlm=config_lib.SRLMConfig(report_consistency=False)).rewards(ctx, rollout, None)
    assert calls == [2] and rewards.previous is None  # no reported consistency, as the oracle
    np.testing.assert_array_equal(rewards.current, 2.0)


def test_scir_pairwise_eft_chats_put_the_better_response_at_the_verdict():
    eft = [
        {"task": "arith", "instruction": "q1", "response": "good1", "kind": "correct", "score": 5},
        {"task": "arith", "instruction": "q2", "response": "good2", "kind": "correct", "score": 5},
        {"task": "arith", "instruction": "q3", "response": "half3", "kind": "wrong", "score": 2},
        {"task": "arith", "instruction": "q4", "response": "junk4", "kind": "off_topic", "score": 1},
        {"task": "choice", "instruction": "c1", "response": "lonely", "kind": "correct", "score": 5},
    ]
    chats = pairwise_eft_chats(eft)
    # q1, q2, q3 pair with another question's worked solution (off-topic: 1 point), both orders; q4
    # (1 point) beats nothing; the choice task has no second solution to pair with.
    assert len(chats) == 6
    own = {e["instruction"]: e["response"] for e in eft}
    for chat in chats:
        prompt, verdict = chat[0]["content"], chat[1]["content"]
        first = prompt.split("<response 1>")[1].split("</response 1>")[0]
        instruction = prompt.split("User: ")[1].split("\n")[0]
        assert verdict == ("1" if first == own[instruction] else "2"), chat
    assert not any("junk4" in c[0]["content"] or "lonely" in c[0]["content"] for c in chats)


def test_scir_step_one_tie_within_tolerance_is_no_agreement():
    lp = jnp.array([-10.0, -12.0])
    tiny = jnp.array([3e-6, -2e-6])  # rounding noise between the scoring and the train-step programs
    p_gen = jnp.array([0.9, 0.1])
    kwargs = dict(beta=0.1, alpha=1.0, divergence="skl")
    _, exact = losses.scir_loss(lp + tiny, lp, lp, lp, p_gen, **kwargs)  # tie_tolerance 0: the noise decides
    _, tolerant = losses.scir_loss(lp + tiny, lp, lp, lp, p_gen, tie_tolerance=1e-3, **kwargs)
    assert float(exact["scir/agreement"]) == 1.0 and float(tolerant["scir/agreement"]) == 0.0
    _, real = losses.scir_loss(lp + jnp.array([0.5, -0.5]), lp, lp, lp, p_gen, tie_tolerance=1e-3, **kwargs)
    assert float(real["scir/agreement"]) == 1.0  # beta * 0.5 = 0.05 > 1e-3: a preference


@pytest.mark.parametrize("n, bs, epochs", [(16, 8, 1), (13, 8, 2), (3, 8, 3), (6, 6, 2)])
def test_epoch_order_visits_each_row_once_per_epoch(n, bs, epochs):
    order = epoch_order(n, bs, epochs, seed=7)
    per_epoch = -(-n // bs) * bs
    assert order.shape == (epochs * per_epoch,)
    for e in range(epochs):
        chunk = order[e * per_epoch:(e + 1) * per_epoch]
        np.testing.assert_array_equal(np.sort(chunk[chunk != PAD]), np.arange(n))
        assert np.all(chunk[n:] == PAD)  # padding only at the end of the epoch's last batch
    np.testing.assert_array_equal(order, epoch_order(n, bs, epochs, seed=7))
    if epochs > 1 and n > 3:
        assert not np.array_equal(order[:n], order[per_epoch:per_epoch + n])  # each epoch its own shuffle


def test_unknown_and_malformed_methods_are_refused():
    with pytest.raises(ValueError, match=r"^config: method='nope' is not one of 'cream', "):
        methods.create(config_lib.RunConfig(method="nope"))

    class Nameless(methods.Method):
        pass

    with pytest.raises(ValueError, match="non-empty name"):
        methods.register(Nameless)
    with pytest.raises(ValueError, match="Method subclass"):
        methods.register(dict)
