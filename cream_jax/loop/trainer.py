"""Training over host records (pre-training, SFT, preference training), checkpointed mid-phase.

One compiled step per (loss, optimizer config), reused across iterations, so iterations >= 2
compile nothing new. The preference stage visits each kept pair exactly once per epoch: every
epoch is its own shuffle, and its last batch is filled to the static batch shape with rows of
weight 0. The LM stages stream over their rows (epochs back to back, full batches).

Shape letters: B batch rows.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from cream_jax import checkpoint, config as config_lib, guards, metrics, sharding, steps
from cream_jax.data import pipeline
from cream_jax.engine import batching
from cream_jax.errors import Divergence

log = logging.getLogger("cream_jax")

PAD = -1  # index of a zero-weight padding row in an epoch order


class NonFiniteLoss(Divergence):
    """A train step produced NaN/inf; the last good checkpoint is kept."""


def epoch_order(n: int, batch_size: int, epochs: int, seed: int) -> np.ndarray:
    """[epochs * ceil(n / batch_size) * batch_size] row indices: each epoch a permutation of range(n)
    (grain's shuffle of epoch e, as the streaming loader draws them), padded with ``PAD`` to whole
    batches, so every row is seen exactly once per epoch."""
    shuffled = grain.MapDataset.source(list(range(n))).shuffle(seed=seed).repeat(epochs)
    per_epoch = max(1, math.ceil(n / batch_size)) * batch_size
    out = np.full((epochs, per_epoch), PAD, np.int64)
    out[:, :n] = np.asarray([shuffled[i] for i in range(n * epochs)], np.int64).reshape(epochs, n)
    return out.reshape(-1)


@dataclasses.dataclass
class Trainer:
    """Runs train phases on one mesh.

    Args:
      graphdef: the model structure (``nnx.split``).
      mesh: the device mesh.
      writer: metric writer (``{name}/{metric}`` scalars).
      save: ``save(state, progress, extra)`` writes a checkpoint (the stage machine's).
      checkpoint_every: train steps between mid-phase checkpoints (0: none).
      checkpoint_dir: named in error messages.
      guard: the divergence limits (``config.GuardConfig``; cream_jax.guards).
    """

    graphdef: Any
    mesh: Any
    writer: Any
    save: Callable[[dict, dict, dict], None]
    checkpoint_every: int = 0
    checkpoint_dir: Any = None
    remat: bool | str | None = None  # Model.remat as a mode: "none" | "full" | "matmuls"
    guard: config_lib.GuardConfig = config_lib.GuardConfig()
    _steps: dict = dataclasses.field(default_factory=dict)

    def step_fn(self, loss_key: Any, loss_fn: Callable, optim: config_lib.OptimConfig, params: Any):
        """(compiled step, optimizer) of a loss, built once per (loss_key, optimizer config)."""
        key = (loss_key, optim)
        if key not in self._steps:
            optimizer = steps.make_optimizer(optim)
            template = steps.abstract_train_state(params, optimizer)  # shardings only, nothing allocated
            step = steps.make_train_step(loss_fn, self.graphdef, optimizer, self.mesh,
                                         steps.state_shardings(template), optim.grad_accum, remat=self.remat)
            self._steps[key] = (step, optimizer)
        return self._steps[key]

    def train(self, *, name: str, loss_fn: Callable, loss_key: Any, records: dict,
              optim: config_lib.OptimConfig, params: Any, progress_base: dict, epochs: int | None = None,
              total_steps: int | None = None, resume: dict | None = None, seed: int = 0,
              exact_epochs: bool = False) -> Any:
        """Trains ``params`` on ``records`` (host arrays with a common leading axis); returns new params.

        ``loss_fn(graphdef, params, batch) -> (loss, metrics)`` (``steps.lm_loss``, a method's
        ``loss_fn``); ``loss_key`` names it for the compiled-step cache (same key, same loss).

        ``exact_epochs``: each row once per epoch, zero-weight padding in the last batch (preference
        training); otherwise rows stream over back-to-back epochs for ``total_steps`` full batches.
        Checkpoints every ``checkpoint_every`` steps with the data-iterator state (and, inside an
        iteration, the records), so ``resume`` continues at the same step and the same next batch.
        """
        n = next(iter(records.values())).shape[0]
        bs = optim.batch_size
        multiple = sharding.batch_multiple(self.mesh) * optim.grad_accum
        if bs % multiple:
            raise ValueError(f"config: {name} batch_size={bs} must be a multiple of data*fsdp*grad_accum={multiple}")
        if exact_epochs:
            order = epoch_order(n, bs, epochs or 1, seed)
            total_steps = len(order) // bs
            loader = pipeline.make_loader({"index": order}, bs, seed=seed, shuffle=False, num_epochs=1, drop_remainder=True)
        else:
            if total_steps is None:
                total_steps = max(1, math.ceil(n / bs)) * (epochs or 1)
            loader = pipeline.make_loader(list(range(n)), bs, seed=seed, shuffle=True, num_epochs=None, drop_remainder=False)
        train_step, optimizer = self.step_fn(loss_key, loss_fn, optim, params)
        state = steps.init_train_state(params, optimizer, jax.random.key(seed))
        guard = guards.DivergenceGuard(self.guard, name, params, keep=self.checkpoint_dir)
        start = 0
        if resume is not None and int(resume["progress"].get("step", 0)) > 0:
            state = resume["state"]["train"]
            loader.set_state(resume["extra"]["loader"])
            guard.set_state(resume["extra"].get("guard"))
            start = int(resume["progress"]["step"])
        log_every = max(1, min(25, total_steps // 10))
        bar = metrics.progress(total=total_steps, desc=name, initial=start)
        for step in range(start, total_steps):
            got = next(loader)
            idx = np.asarray(got["index"] if exact_epochs else got, np.int64).reshape(-1)
            weight = np.zeros((bs,), np.float32)
            if exact_epochs:
                weight[idx != PAD] = 1.0
                idx = np.where(idx == PAD, 0, idx)  # row 0 stands in for padding, at weight 0
            else:
                weight[: len(idx)] = 1.0
                idx = np.concatenate([idx, np.full(bs - len(idx), idx[0] if len(idx) else 0)])
            batch = {k: v[idx] for k, v in records.items()}
            batch["weight"] = weight
            batch = batching.to_global(batch, self.mesh)  # each process places only its devices' rows
            batch["lr"] = jnp.asarray(steps.learning_rate(optim, step, total_steps), jnp.float32)
            state, m = train_step(state, batch)
            if (step + 1) % log_every == 0 or step + 1 == total_steps:
                host = {k: float(v) for k, v in jax.device_get(m).items()}
                if not all(math.isfinite(v) for v in host.values()):
                    raise NonFiniteLoss(f"{name}: non-finite metrics at step {step + 1}: {host}; last good checkpoint "
                                        f"kept in {self.checkpoint_dir}")
                guard.observe(step + 1, host)
                self.writer.scalars(global_step(progress_base, step + 1), {f"{name}/{k}": v for k, v in host.items()})
                bar.set_postfix(loss=f"{host['loss']:.4f}")
            bar.update(1)
            if self.checkpoint_every and (step + 1) % self.checkpoint_every == 0 and step + 1 < total_steps:
                self._check_finite(name, state, step + 1)
                guard.check_params(step + 1, state["params"])
                saved = {"train": state} if progress_base["stage"] != "iteration" else {"train": state, "records": records}
                self.save(saved, {**progress_base, "phase": "train", "step": step + 1}, {"loader": loader.get_state(), "guard": guard.get_state()})
        bar.close()
        self._check_finite(name, state, total_steps)
        guard.check_params(total_steps, state["params"])
        return state["params"]

    def _check_finite(self, name: str, state: dict, step: int) -> None:
        if not checkpoint.is_finite_tree(state["params"]):
            raise NonFiniteLoss(f"{name}: parameters became NaN/inf by step {step}; last good checkpoint kept in "
                                f"{self.checkpoint_dir}")


def global_step(progress_base: dict, step: int) -> int:
    """One step axis for the logs: stage, then iteration, then the phase's own step."""
    stage_offset = {"pretrain": 0, "sft": 1, "iteration": 2}[progress_base["stage"]] * 1_000_000
    return stage_offset + progress_base.get("iteration", 0) * 100_000 + step


# ------------------------------------------------------------------------------------------------
# Records of the LM stages.


def pretrain_records(tokenizer: Any, texts: list[dict], seq_len: int) -> dict:
    """The pre-training corpus, tokenized and packed into ``seq_len`` rows."""
    return pipeline.encode_corpus(tokenizer, texts, seq_len)


def sft_records(tokenizer: Any, chats: list[list[dict]], max_len: int) -> dict:
    """SFT rows; examples left with no response token within ``max_len`` are reported."""
    enc = pipeline.encode_sft(tokenizer, chats, max_len, on_overflow="truncate")
    lost = int((np.asarray(enc["loss_mask"]).sum(axis=1) == 0).sum())
    if lost:  # e.g. judge-training chats, whose rubric prompt alone can exceed SFT.max_len
        log.warning("%d of %d SFT examples have no response token left within SFT.max_len=%d: they teach nothing",
                    lost, len(chats), max_len)
    return {k: np.asarray(enc[k], np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
