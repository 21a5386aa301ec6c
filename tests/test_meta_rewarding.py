"""Meta-Rewarding (methods/meta_rewarding.py): the judged response, battle counting with positional
weights, the judge pair and its filters, the cap on judge pairs per batch against hand
computations; the loss at policy == reference; a CLI run on the smoke config."""

import dataclasses
import json
import math

import numpy as np
import pytest

from cream_jax.config import MetaRewardingConfig, RunConfig
from cream_jax.methods.meta_rewarding import (battle_wins, capped_judge_weight, judge_pair, most_uncertain_response,
                                              positional_weights)
from tests._cli import cli, copy_models

NAN = float("nan")


def test_most_uncertain_response():
    scores = np.array([
        [[4, 4, 4], [1, 5, NAN], [2, 3, 4]],  # variances 0, 4, 2/3 -> response 1
        [[NAN, NAN, 3], [2, 2, 2], [NAN, NAN, NAN]],  # one parsed / no spread / none -> no response
        [[0, 5, NAN], [5, 0, NAN], [1, 2, 3]],  # 6.25, 6.25, 2/3 -> the first of the tie, 0
    ], np.float32)
    np.testing.assert_array_equal(most_uncertain_response(scores), [1, -1, 0])


# win_first[j, k]: shown j first and k second, the meta-judge preferred j.
WIN_FIRST = np.array([[0, 1, 1],
                      [1, 0, 0],
                      [0, 1, 0]], bool)


def test_positional_weights_and_battle_counting_by_hand():
    # 4 of the 6 verdicts favour position 1: a first-position win weighs 2/6, a second-position win 4/6.
    w_first, w_second = positional_weights([WIN_FIRST])
    assert (w_first, w_second) == pytest.approx((1 / 3, 2 / 3))
    # B[j, k] = w1 * F[j, k] + w2 * (1 - F[k, j]):
    #   j=0: k=1: 1/3 + 2/3 * 0 = 1/3; k=2: 1/3 + 2/3 * 1 = 1   -> 4/3
    #   j=1: k=0: 1/3 + 2/3 * 0 = 1/3; k=2: 0 + 2/3 * 0 = 0     -> 1/3
    #   j=2: k=0: 0 + 2/3 * 0 = 0;     k=1: 1/3 + 2/3 * 1 = 1   -> 1
    wins = battle_wins(WIN_FIRST, w_first, w_second)
    np.testing.assert_allclose(wins, [4 / 3, 1 / 3, 1.0])
    assert judge_pair(wins, np.array([4.0, 2.0, 3.0]), ["a", "b", "c"]) == (0, 1, None)
    # Weights pool every battle of the iteration: with a second, all-"2" battle of two judgments
    # (2 verdicts for position 2), 4 of 8 verdicts favour position 1.
    assert positional_weights([WIN_FIRST, np.zeros((2, 2), bool)]) == pytest.approx((0.5, 0.5))


def test_a_meta_judge_that_always_answers_1_decides_nothing():
    always_first = ~np.eye(3, dtype=bool)
    w_first, w_second = positional_weights([always_first])
    assert (w_first, w_second) == (0.0, 1.0)
    wins = battle_wins(always_first, w_first, w_second)
    np.testing.assert_array_equal(wins, [0.0, 0.0, 0.0])
    assert judge_pair(wins, np.array([1.0, 2.0, 3.0]), ["a", "b", "c"])[2] == "tied"


def test_two_judgments_consistent_across_orders():
    # K = 2: j=0 wins shown first ("1") and shown second ("2"): w = 1/2 each, wins [1, 0].
    first = np.array([[0, 1], [0, 0]], bool)
    wins = battle_wins(first, *positional_weights([first]))
    np.testing.assert_allclose(wins, [1.0, 0.0])
    assert judge_pair(wins, np.array([3.0, 3.0]), ["x", "y"])[2] == "same_score"
    assert judge_pair(wins, np.array([3.0, 1.0]), ["x", "x"])[2] == "duplicate"


@pytest.mark.parametrize("share, want", [
    (0.5, [1, 1, 1, 0, 0]),   # cap = floor(1 * 4) = 4: every judge pair of a real row
    (1 / 3, [1, 1, 0, 0, 0]),  # cap = floor(0.5 * 4) = 2
    (0.25, [1, 0, 0, 0, 0]),  # cap = floor(4 / 3) = 1
    (0.0, [0, 0, 0, 0, 0]),
])
def test_judge_share_cap_by_hand(share, want):
    weight = np.array([1, 1, 1, 1, 0], np.float32)  # the last row pads the batch
    judge_valid = np.array([1, 1, 1, 0, 1], np.float32)
    got = np.asarray(capped_judge_weight(weight, judge_valid, share))
    np.testing.assert_array_equal(got, want)
    assert got.sum() / (weight.sum() + got.sum()) <= share + 1e-9


def test_loss_is_log2_at_the_reference_and_reports_the_judge_share():
    import jax
    from flax import nnx

    from cream_jax import scoring
    from cream_jax.methods.meta_rewarding import make_meta_rewarding_loss
    from cream_jax.models.llama import Llama, LlamaConfig

    mc = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, max_position_embeddings=64)
    graphdef, params = nnx.split(Llama(mc, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    ref_logps = jax.jit(lambda p, i, m, r: scoring.sequence_logprobs(nnx.merge(graphdef, p), i, m, r)[0])
    batch = {}
    for prefix, t in (("", 12), ("judge_", 12)):
        for side in ("chosen", "rejected"):
            ids = rng.integers(1, 64, (4, t)).astype(np.int32)
            resp = np.zeros((4, t), np.int32)
            resp[:, t // 2:] = 1
            batch[f"{prefix}{side}_ids"], batch[f"{prefix}{side}_mask"] = ids, np.ones((4, t), np.int32)
            batch[f"{prefix}{side}_resp"] = resp
            batch[f"{prefix}ref_{side}"] = np.asarray(ref_logps(params, ids, batch[f"{prefix}{side}_mask"], resp))
    batch["weight"] = np.array([1, 1, 1, 0], np.float32)
    batch["judge_valid"] = np.array([1, 0, 1, 1], np.float32)
    loss, m = jax.jit(make_meta_rewarding_loss(0.1, 0.5), static_argnums=0)(graphdef, params, batch)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-5)
    assert float(m["judge_loss"]) == pytest.approx(math.log(2), abs=1e-5)
    assert float(m["judge_share"]) == pytest.approx(2 / 5)  # rows 0 and 2 (row 3 pads): 2 of 3 + 2 pairs


def test_config_errors_name_the_field():
    base = RunConfig(method="meta_rewarding")
    for field, value, match in (("max_judge_share", 0.6, r"max_judge_share: 0.6 must be in \[0, 0.5\]"),
                                ("judge_samples", 1, "judge_samples: 1 must be >= 2")):
        with pytest.raises(ValueError, match=f"^MetaRewarding.{match}"):  # a RunConfig checks its ranges on construction
            dataclasses.replace(base, meta_rewarding=dataclasses.replace(MetaRewardingConfig(), **{field: value}))
    with pytest.raises(ValueError, match="MetaRewarding.score_readout: 'mean' must be one of"):
        RunConfig(meta_rewarding=MetaRewardingConfig(score_readout="mean"))


@pytest.mark.slow
def test_meta_rewarding_runs_through_the_cli(smoke_run, tmp_path):
    reference, _ = smoke_run
    workdir = tmp_path / "meta"
    copy_models(reference, workdir, names=("m0",))  # M1 is SFT on the seed set plus the EFT judge data
    cli(workdir, "--gin_file", "configs/meta_rewarding.gin", "--gin_param", "Run.iterations = 1",
        "--gin_param", "MetaRewarding.judge_template = 'compact'", "--gin_param", "MetaRewarding.judge_samples = 2",
        "--gin_param", "MetaRewarding.max_judgment_tokens = 8", "--gin_param", "MetaRewarding.score_readout = 'expected'",
        "--gin_param", "MetaRewarding.max_judge_share = 0.25")
    row = json.loads((workdir / "results.json").read_text())["iterations"][-1]
    stats = row["method"]
    assert row["scored_models"] == ["M1"] and row["pairs_kept"] > 0 and row["consistency"] is not None
    assert stats["judge_responses_meta_judged"] + stats["judge_responses_without_disagreement"] == row["prompts"]
    dropped = sum(stats[f"judge_pairs_dropped_{k}"] for k in ("tied", "same_score", "duplicate"))
    assert stats["judge_pairs"] + dropped == stats["judge_responses_meta_judged"]
    assert stats["judge_pairs"] > 0
    assert stats["judge_pairs_attached"] == min(stats["judge_pairs"], row["pairs_kept"])
    logged = [json.loads(line) for line in (workdir / "logs" / "metrics.jsonl").read_text().splitlines()]
    shares = [m["iter1/train/judge_share"] for m in logged if "iter1/train/judge_share" in m]
    assert shares and max(shares) > 0.0 and all(s <= 0.25 for s in shares)  # judge pairs trained, <= 1/4 of a batch
    # Step 1 has policy == reference: the judge pairs' reference log-probs (scored at curation) match
    # the step's own, so their DPO loss is log 2.
    first = next(m for m in logged if "iter1/train/judge_loss" in m)
    assert first["iter1/train/judge_loss"] == pytest.approx(math.log(2), abs=1e-4)
