"""The method protocol: what a self-rewarding method decides in the one loop, and the registry.

Every method runs the same iteration (``cream_jax.loop``):

  rollout of M_t (N responses per prompt, made once)
    -> log-prob table: the models ``models_to_score(t)`` names, each scored once
    -> ``rewards``: the current reward (ranks the pairs) and the same ranker one iteration earlier
       (its agreement with the current one is the reported consistency)
    -> best-vs-worst pairs of the current reward (generic: ties, too few valid, duplicates dropped)
    -> ``select``: which pairs train and with which soft label (CREAM's C, SeRA's margin cut)
    -> records of the kept pairs + ``extra_records`` -> the trainer with ``loss_fn``, reference M_t.

A method is a subclass of :class:`Method` that overrides the hooks it needs (the defaults are a
plain implicit-reward DPO method) and is registered by name with :func:`register`; ``Run.method``
names it. A module outside the library can register one too (a gin file may ``import`` it), and
nothing outside ``cream_jax.methods`` compares the method name to a string.

Shape letters: B prompts, R responses per prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from cream_jax import rewards as rewards_lib

if TYPE_CHECKING:
    from cream_jax.config import RunConfig
    from cream_jax.engine.host import TokenSpec
    from cream_jax.loop.logprobs import LogProbTable
    from cream_jax.loop.rollout import Rollout
    from cream_jax.preference import Pairs


@dataclasses.dataclass(frozen=True)
class Context:
    """What a hook may use at iteration ``t`` besides the rollout and the log-prob table.

    Attributes:
      t: the iteration (1-based); the policy is M_t.
      cfg: the run configuration (the method's own section is ``cfg.<name>``).
      tokenizer: the run's tokenizer.
      tokens: end-of-sequence and pad ids.
      key: this iteration's PRNG key for method-side sampling (e.g. sampled judgments).
      model: ``model(k)`` -> M_k as a module (k = t is the policy), loaded on demand.
      oracle: [B, R] verifier rewards of the rollout, or None without a verifier and labels.
      eft: judge-training examples of the task data (the built-in suite's, or ``Data.eft_path``'s).
    """

    t: int
    cfg: RunConfig
    tokenizer: Any
    tokens: TokenSpec
    key: Any
    model: Callable[[int], Any]
    oracle: np.ndarray | None = None
    eft: tuple = ()


@dataclasses.dataclass(frozen=True)
class Rewards:
    """A method's rewards of the rollout.

    Attributes:
      current: [B, R] the reward that ranks the pairs (NaN: no score, the response is left out).
      previous: [B, R] the same ranker one iteration earlier (M_{t-1}); None where the method has
        no self-ranker (the oracle), which reports no consistency.
      ranker: [B, R] the ranker at t compared with ``previous`` when ``current`` is not it (SeRA's
        ensemble mixes r_{t-1} into the pair ranking); None: ``current``.
      judge_parse_failures: judgments whose score did not parse (LLM-as-a-judge rewards).
      stats: the method's own statistics of the iteration (JSON-ready), written to the iteration's
        row of results.json under "method" (with :attr:`Selection.stats`).
    """

    current: np.ndarray
    previous: np.ndarray | None
    ranker: np.ndarray | None = None
    judge_parse_failures: int = 0
    stats: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Selection:
    """The pairs that train and their soft labels.

    Attributes:
      pairs: ``preference.Pairs`` whose ``keep``/``status`` say which pairs train (and why the
        others were dropped).
      weight: [B] float32 soft label c of each pair: the loss is c * L(y+, y-) + (1 - c) * L(y-, y+)
        (1 = plain DPO; CREAM's consistency C).
      stats: the method's own statistics of its selection (JSON-ready), merged over
        :attr:`Rewards.stats` into results.json's "method" entry.
    """

    pairs: Pairs
    weight: np.ndarray
    stats: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Method:
    """Base method: implicit DPO reward against the configured reference, plain DPO on every
    best-vs-worst pair. Subclasses set ``name`` and override the hooks that differ."""

    name: ClassVar[str] = ""
    consistency_level: ClassVar[str] = "dyn"  # reported consistency per prompt ("avg": set level)

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    # -- configuration --------------------------------------------------------------------------
    def validate(self) -> None:
        """Raises ValueError (one line naming the fields) for settings this method cannot honour."""

    # -- stage M1 -------------------------------------------------------------------------------
    def sft_examples(self, eft: tuple) -> list[list[dict]]:
        """Chats added to the seed SFT set (e.g. SRLM's judge training, EFT); none by default."""
        return []

    def learns_to_judge(self) -> bool:
        """Whether :meth:`sft_examples` turns EFT examples into judge training (with data files those
        come from ``Data.eft_path``; without them M1 learns no judging, which the trainer warns about)."""
        return False

    # -- one iteration ----------------------------------------------------------------------------
    def models_to_score(self, t: int) -> frozenset[int]:
        """Iterations k whose M_k must score the rollout at iteration t (t itself always: its
        log-probs are the DPO reference). Models not named here are never run on the rollout."""
        return implicit_models(t, self.cfg.reward.reward_reference)

    def rewards(self, ctx: Context, rollout: Rollout, logps: LogProbTable) -> Rewards:
        """The current reward and the previous one of the same ranker (see :class:`Rewards`)."""
        now, prev = implicit_rewards(ctx.t, logps, self.cfg.reward.reward_reference)
        return Rewards(current=now, previous=prev)

    def select(self, ctx: Context, rollout: Rollout, rewards: Rewards, pairs: Pairs, consistency: np.ndarray) -> Selection:
        """Which of the best-vs-worst ``pairs`` train, and their soft labels.

        Args:
          consistency: [B] per-prompt consistency C in [0, 1] (at ``consistency_level``; prompts
            without a defined value hold the set average), or None where ``rewards.previous`` is None.
        """
        return Selection(pairs, np.ones(np.shape(pairs.keep), np.float32))

    def extra_records(self, ctx: Context, rollout: Rollout, pairs: Pairs) -> dict[str, np.ndarray]:
        """Extra arrays per kept pair (leading axis = kept pairs, in prompt order) for the loss."""
        return {}

    # -- training -------------------------------------------------------------------------------
    def loss_fn(self, tokenizer: Any) -> Callable:
        """The preference loss ``loss_fn(graphdef, params, batch) -> (loss, metrics)`` (steps.py)."""
        from cream_jax import steps  # noqa: PLC0415 — model code, only when training

        dpo = self.cfg.dpo
        return steps.make_dpo_loss(dpo.beta, dpo.loss_type, dpo.label_smoothing)


# ------------------------------------------------------------------------------------------------
# The implicit DPO reward (CREAM, SeRA, SCIR): shared by the methods that rank with it.


def reference_of(k: int, reward_reference: str) -> int:
    """The iteration whose model is M_k's reward reference: M0 ("initial") or M_{k-1} ("previous")."""
    return 0 if reward_reference == "initial" else k - 1


def implicit_models(t: int, reward_reference: str) -> frozenset[int]:
    """Models the implicit rewards at t need: M_t and its reference; M_{t-1} and its reference, or
    at t = 1 M0 alone (its ranking is its own length-normalised likelihood, METHODS 2.7-1)."""
    need = {t, reference_of(t, reward_reference)}
    need |= {0} if t == 1 else {t - 1, reference_of(t - 1, reward_reference)}
    return frozenset(need)


def implicit_rewards(t: int, logps: LogProbTable, reward_reference: str) -> tuple[np.ndarray, np.ndarray]:
    """(r_t, r_{t-1}) [B, R]: r_k = logp_{M_k} - logp_{ref(k)} (CREAM 2.2-b: no beta, a ranking is
    invariant to it; METHODS section 0 for the reference); r_0 = M0's length-normalised likelihood."""
    now = np.asarray(rewards_lib.implicit(logps[t], logps[reference_of(t, reward_reference)]))
    if t == 1:
        prev = np.asarray(rewards_lib.likelihood(logps[0], logps.n_tokens))
    else:
        prev = np.asarray(rewards_lib.implicit(logps[t - 1], logps[reference_of(t - 1, reward_reference)]))
    return now, prev


# ------------------------------------------------------------------------------------------------
# The registry.

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Registers a Method subclass under ``cls.name`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
        raise ValueError(f"methods.register: {cls!r} must be a Method subclass with a non-empty name")
    if _REGISTRY.get(cls.name, cls) is not cls:
        raise ValueError(f"methods.register: a method named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> Mapping[str, type[Method]]:
    """Name -> Method class of every registered method."""
    return dict(_REGISTRY)


def create(cfg: RunConfig) -> Method:
    """The method ``cfg.method`` names, validated against ``cfg``."""
    cls = _REGISTRY.get(cfg.method)
    if cls is None:
        raise ValueError(f"config: method={cfg.method!r} is not one of {', '.join(map(repr, sorted(_REGISTRY)))} "
                         "(Run.method; a method of your own: methods.register)")
    method = cls(cfg)
    method.validate()
    return method
