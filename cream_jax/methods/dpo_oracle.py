"""Oracle-reward DPO, the upper bound: the task verifier ranks the responses, plain DPO.

The verifier does not change across iterations, so there is no self-ranker whose consistency
could be measured (none is reported), and only M_t scores the rollout (its log-probs are the DPO
reference).
"""

from __future__ import annotations

from cream_jax.methods.base import Method, Rewards, register


@register
class DPOOracle(Method):
    name = "dpo_oracle"

    def models_to_score(self, t):
        return frozenset({t})

    def rewards(self, ctx, rollout, logps):
        if ctx.oracle is None:
            raise ValueError("config: method='dpo_oracle' needs a verifier and labelled prompts (the embedded suite has both)")
        return Rewards(current=ctx.oracle, previous=None)
