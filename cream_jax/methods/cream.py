"""CREAM (METHODS.md section 2): the implicit DPO reward of M_t ranks the responses, the same
reward of M_{t-1} ranks them again, and their agreement C (Kendall tau, scaled to [0, 1]) is the
soft label of the pair: loss = C * DPO(y+, y-) + (1 - C) * DPO(y-, y+).
"""

from __future__ import annotations

import numpy as np

from cream_jax.methods.base import Method, Selection, register


@register
class Cream(Method):
    name = "cream"

    @property
    def consistency_level(self) -> str:  # "dyn": C per prompt; "avg": the set average (Algorithm 1)
        return self.cfg.cream.consistency_level

    def validate(self) -> None:
        # The soft label c * L(y+, y-) + (1 - c) * L(y-, y+) is the sigmoid loss's label smoothing
        # (METHODS 1); the other DPO-family losses have no such form in the step.
        if self.cfg.dpo.loss_type != "sigmoid":
            raise ValueError(f"config: method='cream' weights each pair by the soft label C, which only "
                             f"DPO.loss_type='sigmoid' supports (got {self.cfg.dpo.loss_type!r})")

    def select(self, ctx, rollout, rewards, pairs, consistency):
        return Selection(pairs, np.asarray(consistency, np.float32))
