"""Divergence guard: stops a training phase whose numbers blow up while staying finite.

A NaN check alone lets a run with an absurd learning rate "finish": the weights grow to ~1e9, the
loss stays finite and results.json records a destroyed model. `DivergenceGuard` watches one phase
(pre-training, SFT, or one iteration's preference training) and raises `Divergence` when

* the loss or the gradient norm of a logged step exceeds ``factor x`` the running median of the
  phase's earlier logged steps (after ``warmup_logs`` of them; never below an absolute floor of 1,
  so a loss that is near zero by design, e.g. a satisfied hinge, does not trip it), or
* the global parameter norm has grown by more than ``param_growth`` times since the phase began.

The trainer calls `DivergenceGuard.observe` with the host metrics it logs and
`DivergenceGuard.check_params` before every checkpoint and at the phase's end, so a checkpoint or
model snapshot is never written from a diverged state: the last good checkpoint is kept.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cream_jax.errors import Divergence

_FLOOR = 1.0  # absolute floor of the loss / gradient-norm limits


@jax.jit
def _sum_of_squares(leaves: list) -> jax.Array:
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)


def param_norm(params: Any) -> float:
    """Global L2 norm of the floating-point leaves: one program and one host transfer.

    One jitted program, not one eager reduction per leaf: across processes every eager reduction
    of a sharded leaf is a collective program of its own, and a two-process CPU run deadlocked in
    that stream of small programs (one process in a leaf's reduction, the other already in the
    checkpoint barrier that follows); on a pod it would also be one dispatch per leaf.
    """
    leaves = [jnp.asarray(x) if not isinstance(x, jax.Array) else x for x in jax.tree.leaves(params)]
    leaves = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return 0.0
    return float(np.sqrt(float(_sum_of_squares(leaves))))


class DivergenceGuard:
    """Watches one training phase; see the module docstring.

    Args:
      cfg: a `cream_jax.config.GuardConfig` (warmup_logs, loss_factor, grad_norm_factor,
        param_growth).
      phase: the phase's name for messages ("pretrain", "sft", "iter1/train").
      params: the phase's initial params (the reference of the parameter-growth limit).
      keep: where the last good checkpoint stays, named in the message.
    """

    def __init__(self, cfg: Any, phase: str, params: Any, keep: Any = None):
        self.cfg = cfg
        self.phase = phase
        self.keep = keep
        self.start_norm = param_norm(params)
        self.history: dict[str, list[float]] = {"loss": [], "grad_norm": []}

    def get_state(self) -> dict:
        """The running history, JSON-able: a mid-phase checkpoint keeps it, so a resumed phase
        compares against the same median as an uninterrupted one (not a fresh warm-up)."""
        return {k: list(v) for k, v in self.history.items()}

    def set_state(self, state: dict | None) -> None:
        """Continues from `state` (None: a checkpoint written before the guard was kept)."""
        if state is not None:
            self.history = {k: [float(x) for x in state.get(k, [])] for k in self.history}

    def _fail(self, what: str) -> None:
        where = f"; the last good checkpoint is kept in {self.keep}" if self.keep else ""
        raise Divergence(f"{self.phase}: {what}{where}. Lower the learning rate (or raise the Guard.* limit)")

    def observe(self, step: int, metrics: dict[str, float]) -> None:
        """Checks one logged step's host metrics ("loss", "grad_norm"), then adds them to the history."""
        factors = {"loss": self.cfg.loss_factor, "grad_norm": self.cfg.grad_norm_factor}
        for key, factor in factors.items():
            if key not in metrics:
                continue
            value, seen = float(metrics[key]), self.history[key]
            if len(seen) >= self.cfg.warmup_logs:
                median = float(np.median(seen))
                limit = max(factor * abs(median), _FLOOR)
                if value > limit:
                    option = "Guard.loss_factor" if key == "loss" else "Guard.grad_norm_factor"
                    self._fail(f"{key} {value:.4g} at step {step} is over {factor:g}x its running median {median:.4g} "
                               f"({option})")
            seen.append(value)

    def check_params(self, step: int, params: Any) -> None:
        """Refuses params whose global norm grew more than ``param_growth`` times in this phase."""
        norm = param_norm(params)
        if self.start_norm > 0 and norm > self.cfg.param_growth * self.start_norm:
            self._fail(f"the parameter norm grew {norm / self.start_norm:.3g}x ({self.start_norm:.4g} -> {norm:.4g}) "
                       f"by step {step}, over Guard.param_growth={self.cfg.param_growth:g}")
