"""Pure training steps: one jitted function per stage, built once per run by a ``make_*`` factory.

A step is ``train_step(state, batch) -> (state, metrics)`` where ``state`` is a plain pytree
``{"step", "params", "opt_state", "rng"}`` and ``batch`` a dict of arrays sharded over the batch
axes of the mesh. The learning rate arrives in the batch (``batch["lr"]``, a scalar computed on
the host from the schedule), so a new schedule length in the next iteration reuses the same
compiled step. Gradients are averaged over the global batch (METHODS section 0) — automatic, since
the step is one program over the whole mesh. Each batch row carries a ``weight`` (0 for the
padding rows that fill the last batch to its static shape).

Shape letters: B batch (examples or pairs), T time, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cream_jax import losses, scoring, sharding
from cream_jax.config import OptimConfig
from cream_jax.models.llama import remat_mode
from cream_jax.sharding import LOGICAL_AXIS_RULES

PyTree = Any
LossFn = Callable[[Any, PyTree, dict], tuple[jax.Array, dict]]


# ------------------------------------------------------------------------------------------
# Optimizer: AdamW = clip -> Adam scaling -> decoupled weight decay -> (-lr), lr from the host.


def make_optimizer(optim: OptimConfig) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; the learning rate is applied by the step (see module doc).

    Weight decay skips 1-D parameters (norm scales, biases), as HF/TRL trainers do.
    """
    decay_mask = lambda params: jax.tree.map(lambda p: jnp.ndim(p) > 1, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(optim.max_grad_norm),
        optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
        optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
    )


def learning_rate(optim: OptimConfig, step: int, total_steps: int) -> float:
    """Linear warm-up over ``round(warmup_ratio * total_steps)`` steps, then cosine decay to
    ``learning_rate * end_lr_ratio`` (METHODS 2.4). Step 0 already learns (warm-up starts at
    peak / warmup rather than HF's 0), and a one-step run uses the peak rate."""
    total_steps = max(int(total_steps), 1)
    warmup = int(round(optim.warmup_ratio * total_steps))
    peak, end = optim.learning_rate, optim.learning_rate * optim.end_lr_ratio
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def abstract_train_state(params: PyTree, optimizer: optax.GradientTransformation) -> dict:
    """The train state's ``jax.ShapeDtypeStruct`` tree (with shardings) for ``params`` (arrays or
    abstract ``ShapeDtypeStruct`` with shardings): optimizer moments sharded like their params,
    scalars (step, counts, RNG key) replicated. Built with ``jax.eval_shape``: nothing is allocated."""
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    replicated = NamedSharding(mesh, P())
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    abstract_params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params,
                                   param_shardings)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, abstract_opt, param_shardings,
        transform_non_params=lambda _: replicated,
    )
    key = jax.eval_shape(lambda: jax.random.key(0))
    return {
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        "params": abstract_params,
        "opt_state": jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_opt,
                                  opt_shardings),
        "rng": jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
    }


def init_train_state(params: PyTree, optimizer: optax.GradientTransformation, rng: jax.Array) -> dict:
    """A fresh train state on the params' mesh, laid out as `abstract_train_state`.

    The params are copied: the step donates its state, and the caller's params (e.g. M_t, still
    needed as M_{t-1} by the next iteration) must survive. Scalars are placed from this process's
    own copy (``make_array_from_process_local_data``), never by a cross-process ``device_put``.
    """
    abstract = abstract_train_state(params, optimizer)
    replicated = abstract["step"].sharding
    opt_shardings = jax.tree.map(lambda x: x.sharding, abstract["opt_state"])
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    params = jax.tree.map(lambda x: x.copy(), params)
    local = lambda x: jax.make_array_from_process_local_data(replicated, x, np.shape(x))  # noqa: E731
    return {
        "step": local(np.zeros((), np.int32)),
        "params": params,
        "opt_state": opt_state,
        # Through the raw key data: a typed key made on one device cannot be placed across processes.
        "rng": jax.random.wrap_key_data(local(np.asarray(jax.random.key_data(rng))), impl=jax.random.key_impl(rng)),
    }


def state_shardings(state: dict) -> PyTree:
    return jax.tree.map(lambda x: x.sharding, state)


# ------------------------------------------------------------------------------------------
# Losses over a batch, each returning (scalar loss, flat metrics).


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def lm_loss(graphdef: Any, params: PyTree, batch: dict) -> tuple[jax.Array, dict]:
    """Next-token cross-entropy on ``loss_mask`` tokens (pre-training: all real tokens; SFT: the
    response and its end-of-turn token only, METHODS section 0). Token-weighted over the batch."""
    model = nnx.merge(graphdef, params)
    # losses.sft_loss of the full logits, with the LM head run over time chunks (scoring module).
    sum_logp, n_tokens = scoring.model_response_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                                         batch["loss_mask"])
    n_tokens = n_tokens.astype(jnp.float32)
    per_example = -sum_logp / jnp.maximum(n_tokens, 1.0)  # (B,)
    tokens = n_tokens * batch["weight"]
    loss = jnp.sum(per_example * tokens) / jnp.maximum(jnp.sum(tokens), 1.0)
    return loss, {"loss": loss, "tokens": jnp.sum(tokens)}


def _policy_pair_logps(graphdef: Any, params: PyTree, batch: dict) -> tuple[jax.Array, ...]:
    """Summed response log-probs of chosen and rejected, one forward over both (rows [chosen; rejected])."""
    model = nnx.merge(graphdef, params)
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]], axis=0)  # (2B, T)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
    resp = jnp.concatenate([batch["chosen_resp"], batch["rejected_resp"]], axis=0)
    sum_logp, n_tokens = scoring.model_response_logprobs(model, ids, mask, resp)  # (2B,), (2B,)
    b = batch["chosen_ids"].shape[0]
    return sum_logp[:b], sum_logp[b:], n_tokens[:b], n_tokens[b:]


def make_dpo_loss(beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> LossFn:
    """DPO family with a per-pair soft label: ``batch["consistency"]`` is CREAM's C (1 = plain DPO).

    For ``sigmoid`` the pair loss is ``C * DPO(y+, y-) + (1 - C) * DPO(y-, y+)`` (METHODS 2.3),
    i.e. label smoothing ``1 - C``; a configured ``label_smoothing`` is applied on top for plain DPO.
    """

    def loss_fn(graphdef, params, batch):
        chosen, rejected, n_chosen, n_rejected = _policy_pair_logps(graphdef, params, batch)
        ref_chosen, ref_rejected = batch["ref_chosen"], batch["ref_rejected"]
        if loss_type == "sigmoid":
            smoothing = 1.0 - batch["consistency"] * (1.0 - label_smoothing)
            per_pair = losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, label_smoothing=smoothing)
        elif loss_type == "simpo":
            per_pair = losses.dpo_loss(
                chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type="simpo",
                chosen_lengths=n_chosen, rejected_lengths=n_rejected,
            )
        else:
            per_pair = losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type)
        w = batch["weight"]
        loss = _weighted_mean(per_pair, w)
        chosen_r = beta * (chosen - ref_chosen)
        rejected_r = beta * (rejected - ref_rejected)
        metrics = {
            "loss": loss,
            "rewards/chosen": _weighted_mean(chosen_r, w),
            "rewards/rejected": _weighted_mean(rejected_r, w),
            "rewards/margins": _weighted_mean(chosen_r - rejected_r, w),
            "rewards/accuracies": _weighted_mean((chosen_r > rejected_r).astype(jnp.float32), w),
            "consistency/weight": _weighted_mean(batch["consistency"], w),
        }
        return loss, metrics

    return loss_fn


def make_scir_loss(beta: float, alpha: float, gamma: float, divergence: str, verdict_ids: tuple[int, int],
                   tie_tolerance: float = 0.0) -> LossFn:
    """SCIR (METHODS 5.2, [MEM] reconstruction): the generative preference comes from the same
    policy judging both orders of the pair, inside the step, so the consistency term is
    differentiable in both internal reward models."""
    from cream_jax import judge  # noqa: PLC0415

    def loss_fn(graphdef, params, batch):
        chosen, rejected, _, _ = _policy_pair_logps(graphdef, params, batch)
        model = nnx.merge(graphdef, params)
        # The LM head on the last (left-padded) position only: no [B, T, V] logits.
        logits_12 = model.logits(model.hidden_states(batch["judge12_ids"], batch["judge12_mask"])[0][:, -1])  # (B, V)
        logits_21 = model.logits(model.hidden_states(batch["judge21_ids"], batch["judge21_mask"])[0][:, -1])  # (B, V)
        p_gen = judge.pairwise_preference(logits_12, logits_21, *verdict_ids)  # (B,) p(y1 better)
        per_pair, m = losses.scir_loss(
            chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], p_gen,
            beta=beta, alpha=alpha, gamma=gamma, divergence=divergence, tie_tolerance=tie_tolerance,
            weight=batch["weight"],
        )
        w = batch["weight"]
        loss = _weighted_mean(per_pair, w)
        metrics = {"loss": loss, **{k: jnp.mean(v) for k, v in m.items()}}
        return loss, metrics

    return loss_fn


# ------------------------------------------------------------------------------------------
# The step factory: one jit site, explicit shardings, donated state.


def _with_remat(graphdef: Any, params: PyTree, remat: bool | str) -> Any:
    """``graphdef`` with its model's ``remat`` attribute set (a static attribute, so at trace time)."""
    model = nnx.merge(graphdef, params)
    model.remat = remat
    return nnx.graphdef(model)


def make_train_step(
    loss_fn: LossFn,
    graphdef: Any,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    state_sharding: PyTree,
    grad_accum: int = 1,
    remat: bool | str | None = None,
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """Builds ``train_step(state, batch) -> (state, metrics)``, jitted once.

    With ``grad_accum > 1`` the batch is split into that many micro-batches along its leading axis,
    their gradients are summed by a scan, and one update is applied. ``remat`` (``Model.remat``:
    False/"none", True/"full", "matmuls"; None keeps the graphdef's own setting) sets the layer
    rematerialisation of every forward this step differentiates (`cream_jax.models.llama.Llama`),
    so scoring and sampling programs of the same model are not affected.
    """
    if remat is not None:
        remat_mode(remat)  # a bad value fails here, before any compile
    batch_spec = P(LOGICAL_AXIS_RULES["batch"])

    def grads_of(graphdef, params, batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(graphdef, params, batch)
        return grads, metrics

    def step(state, batch):
        lr = batch.pop("lr")
        params = state["params"]
        step_graphdef = graphdef if remat is None else _with_remat(graphdef, params, remat)
        if grad_accum == 1:
            grads, metrics = grads_of(step_graphdef, params, batch)
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

            def body(acc, mb):
                g, m = grads_of(step_graphdef, params, mb)
                return jax.tree.map(jnp.add, acc, g), m

            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, metrics = jax.lax.scan(body, zeros, micro)
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
            metrics = jax.tree.map(jnp.mean, metrics)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        updates = jax.tree.map(lambda u: -lr * u, updates)
        params = optax.apply_updates(params, updates)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "lr": lr}
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}
        return new_state, metrics

    replicated = NamedSharding(mesh, P())

    def batch_sharding(batch):
        return {k: replicated if k == "lr" else NamedSharding(mesh, P(*batch_spec, *([None] * (np.ndim(v) - 1))))
                for k, v in batch.items()}

    compiled = {}

    def jitted(batch):
        key = tuple(sorted((k, np.shape(v)) for k, v in batch.items()))
        if key not in compiled:
            compiled[key] = jax.jit(
                step,
                in_shardings=(state_sharding, batch_sharding(batch)),
                out_shardings=(state_sharding, replicated),
                donate_argnums=(0,),
            )
        return compiled[key]

    def train_step(state, batch):
        return sharding.on_mesh(jitted(batch), mesh)(state, batch)

    # For cost and memory analysis (tests, `cream_jax.plan`): abstract state and batch work too.
    train_step.lower = lambda state, batch: sharding.on_mesh(jitted(batch), mesh).lower(state, batch)
    return train_step
