"""SeRA (METHODS.md section 4, a [MEM] reconstruction from the abstract): preference
bootstrapping on fresh samples of the policy. M_t's implicit reward labels each prompt's fresh
responses (best vs worst) and only the top ``SeRA.ratio`` of the pairs by implicit reward margin
train (``preference.bootstrap_pairs``; the others are dropped as "unselected"). Optionally the
pair ranking is the ensemble w * r_t + (1 - w) * r_{t-1} against self-bias. Plain DPO.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cream_jax import preference, rewards as rewards_lib
from cream_jax.methods.base import Method, Rewards, Selection, implicit_rewards, register


@register
class SeRA(Method):
    name = "sera"

    def rewards(self, ctx, rollout, logps):
        now, prev = implicit_rewards(ctx.t, logps, self.cfg.reward.reward_reference)
        w = self.cfg.sera.ensemble_weight
        if ctx.t >= 2 and w < 1.0:  # at t = 1 there is no earlier implicit reward to mix in
            return Rewards(current=np.asarray(rewards_lib.ensemble([now, prev], [w, 1.0 - w])), previous=prev, ranker=now)
        return Rewards(current=now, previous=prev)

    def select(self, ctx, rollout, rewards, pairs, consistency):
        dedup = self.cfg.reward.dedup
        boot = preference.bootstrap_pairs(
            jnp.asarray(rewards.current), jnp.asarray(rollout.valid & np.isfinite(rewards.current)),
            ratio=self.cfg.sera.ratio,
            response_ids=jnp.asarray(rollout.tokens) if dedup else None,
            response_mask=jnp.asarray(rollout.token_mask) if dedup else None,
        )
        return Selection(boot, np.ones(np.shape(boot.keep), np.float32))
