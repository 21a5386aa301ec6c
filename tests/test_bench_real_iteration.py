"""The pure helpers of bench/real_iteration.py (the bench itself needs the SmolLM2 wheel and minutes)."""

import numpy as np
import pytest

from bench import real_iteration
from cream_jax import config as config_lib


def test_kendall_consistency_matches_the_formula_and_fills_undefined_prompts():
    r_now = np.array([[0.1, 0.5, 0.3, 0.9], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    r_prev = np.array([[0.2, 0.1, 0.4, 0.8], [4.0, 3.0, 2.0, 1.0], [0.3, 0.1, 0.2, 0.4]])
    c = real_iteration.kendall_consistency(r_now, r_prev)
    # METHODS 1: tau = 2 / (N (N - 1)) sum_{i<i'} sign((J_i - J_i')(K_i - K_i')), no ties here.
    i, k = np.triu_indices(4, 1)
    tau0 = np.sign((r_now[0, i] - r_now[0, k]) * (r_prev[0, i] - r_prev[0, k])).mean()
    np.testing.assert_allclose(c[:2], [(tau0 + 1) / 2, 0.0], atol=1e-12)
    np.testing.assert_allclose(c[2], c[:2].mean(), atol=1e-12)  # a constant reward: tau undefined -> the mean


class _Tok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(ch) for ch in text]}


def test_response_tokens_appends_end_of_turn_only_below_the_limit():
    assert real_iteration.response_tokens(_Tok(), "ab", 4, eot=0) == [97, 98, 0]
    assert real_iteration.response_tokens(_Tok(), "abcdef", 4, eot=0) == [97, 98, 99, 100]


def test_bindings_make_a_valid_one_iteration_run():
    config_lib.parse_gin(real_iteration.GIN_FILES, real_iteration.bindings(4, 3, 16, 4))
    cfg = config_lib.build_run_config()
    assert (cfg.iterations, cfg.sampling.num_samples, cfg.sampling.max_new_tokens) == (1, 3, 16)
    assert (cfg.natural.pool_per_iteration, cfg.dpo.optim.batch_size, cfg.eval.num_logged_samples) == (2, 4, 4)
    with pytest.raises(ValueError, match="even"):
        real_iteration.bindings(3, 2, 8, 4)
