"""Length-controlled self-reward (methods/length_control.py): the alpha sweep, the adjusted
rewards and the length gaps against hand computations, and a CLI run on the smoke config."""

import dataclasses
import json

import numpy as np
import pytest

from cream_jax import methods
from cream_jax.config import LengthControlConfig, RunConfig
from cream_jax.loop.rollout import Rollout
from cream_jax.methods.length_control import pair_length_gap, search_alpha
from tests._cli import cli, copy_models

# Two prompts, three responses each (all valid, all distinct).
#   prompt 0: r = [3, 2, 1], |y| = [10, 6, 4];  prompt 1: r = [0, 1, 0.5], |y| = [4, 8, 4]
# r - a|y| crosses at: prompt 0: y0=y1 at a=1/4, y0=y2 at 1/3, y1=y2 at 1/2;
#                      prompt 1: y1=y2 at 1/8, y0=y1 at 1/4 (y2 - y0 = 0.5 always).
# Best-vs-worst pairs and their gaps |y+| - |y-|:
#   a < 1/8:       p0 (y0, y2): 6;  p1 (y1, y0): 4   -> mean 5
#   1/8 < a < 1/4: p0 (y0, y2): 6;  p1 (y2, y0): 0   -> mean 3
#   1/4 < a < 1/3: p0 (y1, y2): 2;  p1 (y2, y1): -4  -> mean -1
#   1/3 < a < 1/2: p0 (y1, y0): -4; p1 (y2, y1): -4  -> mean -4
REWARDS = np.array([[3.0, 2.0, 1.0], [0.0, 1.0, 0.5]], np.float32)
LENGTHS = np.array([[10, 6, 4], [4, 8, 4]], np.float32)
VALID = np.ones((2, 3), bool)


@pytest.mark.parametrize("alpha, gap", [(0.0, 5.0), (0.1, 5.0), (0.2, 3.0), (0.3, -1.0), (0.4, -4.0)])
def test_pair_length_gap_matches_hand_computation(alpha, gap):
    got, n = pair_length_gap(REWARDS, LENGTHS, VALID, alpha)
    assert n == 2 and got == pytest.approx(gap)


def test_search_alpha_is_dice_sweep_with_early_stop():
    # grid 0, 0.1, ..., 0.9: gaps 5, 5, 3, -1, -4 -> |-4| > 1 stops the sweep; the smallest |gap| is at 0.3.
    alpha, tried = search_alpha(REWARDS, LENGTHS, VALID, alpha_max=1.0, alpha_step=0.1)
    assert alpha == pytest.approx(0.3)
    assert [round(a, 6) for a, _ in tried] == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert [g for _, g in tried] == pytest.approx([5.0, 5.0, 3.0, -1.0, -4.0])
    # dice's own grid (step 0.001): the first alpha past 1/4 where the gap is -1.
    alpha, _ = search_alpha(REWARDS, LENGTHS, VALID, alpha_max=1.0, alpha_step=0.001)
    assert alpha == pytest.approx(0.251)


def test_search_alpha_never_rewards_length():
    # The chosen responses are already the shorter ones: p0 (y0, y2) gap 4 - 10 = -6 and p1 (y1, y0)
    # gap 4 - 8 = -4 for every a >= 0 (a penalty keeps the same pairs), so the sweep never improves
    # on a = 0 (equal gaps do not stop it: it runs the whole grid).
    lengths = np.array([[4, 6, 10], [8, 4, 8]], np.float32)
    alpha, tried = search_alpha(REWARDS, lengths, VALID, alpha_max=1.0, alpha_step=0.1)
    assert alpha == 0.0 and len(tried) == 10
    assert [g for _, g in tried] == pytest.approx([-5.0] * 10)


def test_invalid_and_tied_responses_are_not_paired():
    valid = np.array([[True, False, True], [True, True, True]])
    gap, n = pair_length_gap(REWARDS, LENGTHS, valid, 0.0)  # p0 pairs (y0, y2): 6; p1: 4
    assert n == 2 and gap == pytest.approx(5.0)
    tied = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.5]], np.float32)
    gap, n = pair_length_gap(tied, LENGTHS, VALID, 0.0)  # p0 has no preference: only p1's gap 4
    assert n == 1 and gap == pytest.approx(4.0)
    assert pair_length_gap(tied[:1], LENGTHS[:1], VALID[:1], 0.0) == (None, 0)


@methods.register
class FixedReward(methods.Method):
    """A base method whose reward is the table above (its ranker the same one iteration earlier)."""

    name = "test_fixed_reward"

    def rewards(self, ctx, rollout, logps):
        return methods.Rewards(current=REWARDS.copy(), previous=REWARDS.copy(), stats={"base": 1})


def _rollout():
    s = int(LENGTHS.max())
    mask = (np.arange(s) < LENGTHS[..., None]).astype(np.int32)  # [B, R, S]
    tokens = np.arange(2 * 3 * s, dtype=np.int32).reshape(2, 3, s) * mask  # distinct responses
    return Rollout([], np.zeros((2, 1), np.int32), np.ones((2, 1), np.int32), tokens, mask, {}, [["a"] * 3] * 2)


@pytest.mark.parametrize("alpha", [None, 0.2])
def test_wrapper_adjusts_the_current_reward_only(alpha):
    cfg = RunConfig(method="length_control",
                    length_control=LengthControlConfig(base="test_fixed_reward", alpha=alpha, alpha_step=0.1))
    method = methods.create(cfg)
    rollout = _rollout()
    ctx = methods.Context(t=1, cfg=cfg, tokenizer=None, tokens=None, key=None, model=None)
    rw = method.rewards(ctx, rollout, None)
    a = 0.3 if alpha is None else 0.2
    np.testing.assert_allclose(rw.current, REWARDS - a * LENGTHS, rtol=1e-6)
    np.testing.assert_array_equal(rw.ranker, REWARDS)  # consistency: the base ranker, unadjusted
    np.testing.assert_array_equal(rw.previous, REWARDS)
    assert rw.stats["base"] == 1 and rw.stats["length_alpha"] == pytest.approx(a)
    assert rw.stats["length_gap_before"] == pytest.approx(5.0) and rw.stats["length_pairs_before"] == 2
    assert rw.stats["length_gap_after"] == pytest.approx(-1.0 if alpha is None else 3.0)
    from cream_jax.loop.curate import build_pairs

    pairs = build_pairs(rw.current, rollout.valid, rollout.tokens, rollout.token_mask)
    sel = method.select(ctx, rollout, rw, pairs, None)
    assert sel.stats["length_gap_trained"] == pytest.approx(rw.stats["length_gap_after"])


def test_response_token_stats_by_hand():
    from cream_jax.loop.curate import response_token_stats

    token_mask = np.zeros((3, 2, 5), np.int32)
    for (b, r), n in {(0, 0): 5, (0, 1): 2, (1, 0): 3, (1, 1): 0, (2, 0): 4, (2, 1): 1}.items():
        token_mask[b, r, :n] = 1
    # Prompt 1 is not kept; the empty response (1, 1) is not a sampled response.
    got = response_token_stats(token_mask, chosen=np.array([1, 0, 0]), rejected=np.array([0, 1, 1]),
                               keep=np.array([True, False, True]))
    assert got == {"rollout": (5 + 2 + 3 + 4 + 1) / 5, "chosen": (2 + 4) / 2, "rejected": (5 + 1) / 2}
    assert response_token_stats(token_mask, np.zeros(3, int), np.ones(3, int), np.zeros(3, bool))["chosen"] is None


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="LengthControl.base='length_control'"):
        methods.create(RunConfig(method="length_control", length_control=LengthControlConfig(base="length_control")))
    with pytest.raises(ValueError, match=r"^LengthControl.alpha: -0.1 must be >= 0 \(a length penalty\) or None"):
        methods.create(RunConfig(method="length_control", length_control=LengthControlConfig(alpha=-0.1)))
    with pytest.raises(ValueError, match="DPO.loss_type='sigmoid'"):  # the base method's own check
        methods.create(dataclasses.replace(RunConfig(method="length_control"), dpo=dataclasses.replace(
            RunConfig().dpo, loss_type="ipo")))


@pytest.mark.slow
def test_length_controlled_cream_runs_through_the_cli(smoke_run, tmp_path):
    reference, _ = smoke_run
    workdir = tmp_path / "lc"
    copy_models(reference, workdir)
    cli(workdir, "--gin_file", "configs/length_control.gin", "--gin_param", "Run.iterations = 1")
    row = json.loads((workdir / "results.json").read_text())["iterations"][-1]
    stats = row["method"]
    assert row["pairs_kept"] > 0 and stats["length_pairs_before"] > 0
    assert stats["length_alpha"] >= 0.0 and stats["length_alphas_tried"] >= 1
    assert abs(stats["length_gap_after"]) <= abs(stats["length_gap_before"])  # alpha = 0 is the sweep's start
    assert stats["length_gap_trained"] == pytest.approx(stats["length_gap_after"])  # CREAM keeps every pair
    # The row's own length means (loop/curate.py) agree with this module's gap on the same pairs.
    lengths = row["response_tokens"]
    assert lengths["chosen"] - lengths["rejected"] == pytest.approx(stats["length_gap_trained"], abs=1e-4)
    cream_row = json.loads((reference / "results.json").read_text())["iterations"][1]
    # The consistency is CREAM's own (the same rollout at t = 1, the unadjusted ranker).
    assert row["consistency"] == pytest.approx(cream_row["consistency"])
    assert row["scored_models"] == cream_row["scored_models"]
    if stats["length_gap_before"] == 0.0:  # the smoke model rarely stops before Sampling.max_new_tokens
        assert stats["length_alpha"] == 0.0 and stats["length_alphas_tried"] == 1
        assert row["pairs_kept"] == cream_row["pairs_kept"]  # then it is CREAM, end to end
        assert row["accuracy"] == pytest.approx(cream_row["accuracy"])
    samples = [json.loads(line) for line in (workdir / "samples" / "iter_1.jsonl").read_text().splitlines()]
    for s in (s for s in samples if "rewards" in s and s["kept"]):  # pairs ranked by the adjusted reward
        assert s["rewards"][s["chosen"]] == max(s["rewards"]) and s["rewards"][s["rejected"]] <= min(
            r for i, r in enumerate(s["rewards"]) if s["responses"][i] != s["responses"][s["chosen"]])
