"""A method defined in this file (no library edit) runs end to end through the CLI's stages.

The CLI process registers it by importing this module from a gin binding (``import
tests.test_method_plugin``); ``Run.method`` then names it like a library method.
"""

import json

import numpy as np
import pytest

from cream_jax import methods
from tests._cli import cli, copy_models


@methods.register
class ShortestWins(methods.Method):
    """Toy: the shorter response text is better (reward = -characters), every pair at soft label
    0.75, and no model but the policy scores the rollout."""

    name = "test_shortest"

    def models_to_score(self, t):
        return frozenset({t})

    def rewards(self, ctx, rollout, logps):
        length = -np.array([[len(text) for text in row] for row in rollout.texts], np.float32)
        return methods.Rewards(current=length, previous=length)

    def select(self, ctx, rollout, rewards, pairs, consistency):
        return methods.Selection(pairs, np.full(np.shape(pairs.keep), 0.75, np.float32))


def test_registry_rejects_a_second_method_of_the_same_name():
    class Other(methods.Method):
        name = "test_shortest"

    with pytest.raises(ValueError, match="already registered"):
        methods.register(Other)
    assert methods.registered()["test_shortest"] is ShortestWins


@pytest.mark.slow
def test_method_defined_in_a_test_file_runs_through_the_cli(smoke_run, tmp_path):
    reference, _ = smoke_run
    workdir = tmp_path / "plugin"
    copy_models(reference, workdir)
    cli(workdir, "--gin_param", "import tests.test_method_plugin", "--gin_param", "Run.method = 'test_shortest'",
        "--gin_param", "Run.iterations = 1")
    row = json.loads((workdir / "results.json").read_text())["iterations"][-1]
    assert row["iteration"] == 1 and row["pairs_kept"] > 0
    assert row["scored_models"] == ["M1"]  # the toy declared only the policy
    assert row["consistency"]["mean"] == 1.0  # the same length ranking at t and t-1
    samples = [json.loads(line) for line in (workdir / "samples" / "iter_1.jsonl").read_text().splitlines()]
    for s in (s for s in samples if "rewards" in s and s["kept"]):
        assert s["rewards"][s["chosen"]] > s["rewards"][s["rejected"]]  # shorter chosen
        assert all(float(r).is_integer() and r <= 0 for r in s["rewards"])  # minus character counts
    logged = [json.loads(line) for line in (workdir / "logs" / "metrics.jsonl").read_text().splitlines()]
    weights = [m["iter1/train/consistency/weight"] for m in logged if "iter1/train/consistency/weight" in m]
    assert weights and all(w == pytest.approx(0.75) for w in weights)  # the toy's soft label reached the loss
