"""The log-prob table of a rollout: the summed response log-probs under each model M_k a method
names, each model run once over the rollout, and no model that no reward needs.

Shape letters: B prompts, R responses per prompt.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from cream_jax.engine.host import score_sequences


class LogProbTable:
    """``table[k]`` -> [B, R] float32 summed log-probs of the rollout's responses under M_k.

    Args:
      seqs: the rollout's joined rows (``Rollout.seqs``), [B * R, T] each.
      shape: (B, R).
      model: ``model(k)`` -> M_k as a module.
      batch_size: rows per scoring forward.
      progress: optional ``progress(iterable, label)`` wrapper (a progress bar).
    """

    def __init__(self, seqs: dict, shape: tuple[int, int], model: Callable[[int], Any], batch_size: int,
                 progress: Callable | None = None):
        self._seqs, self._shape, self._model, self._batch_size, self._progress = seqs, shape, model, batch_size, progress
        self._logps: dict[int, np.ndarray] = {}
        self.n_tokens: np.ndarray | None = None  # [B, R] scored tokens per response
        self.seconds: dict[int, float] = {}  # k -> wall seconds of M_k's forwards (loading included)

    def score(self, ks: Iterable[int]) -> LogProbTable:
        """Scores the rollout under every M_k of ``ks`` not scored yet (highest k first: M_t, the
        policy, is resident, older models may come from disk)."""
        for k in sorted(set(ks) - set(self._logps), reverse=True):
            progress = (lambda it, k=k: self._progress(it, f"M{k}")) if self._progress else None
            tic = time.perf_counter()
            logp, n_tok = score_sequences(self._model(k), self._seqs, self._batch_size, progress=progress)  # host arrays
            self.seconds[k] = time.perf_counter() - tic
            self._logps[k] = np.asarray(logp).reshape(self._shape)
            if self.n_tokens is None:
                self.n_tokens = np.asarray(n_tok).reshape(self._shape)
        return self

    @property
    def scored(self) -> frozenset[int]:
        return frozenset(self._logps)

    def __getitem__(self, k: int) -> np.ndarray:
        if k not in self._logps:
            raise KeyError(f"M{k} did not score the rollout: the method's models_to_score(t) must name it "
                           f"(scored: {sorted(self._logps)})")
        return self._logps[k]
