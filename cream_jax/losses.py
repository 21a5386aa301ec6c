"""Training losses: SFT, the DPO family, CREAM's consistency-weighted DPO, and SCIR (METHODS 1, 2.3, 5.2).

Every function is a plain ``jnp`` function of per-sequence log-probabilities (or logits for SFT),
returns per-example losses ``[B]`` in float32 and is safe under ``jax.jit``, ``jax.vmap`` and
``jax.grad``; the trainer reduces them (``losses.mean()``) inside its jitted step. Sigmoids go
through ``jax.nn.log_sigmoid`` so gradients stay finite for margins of +-1e4.

Sequence log-probs are sums over the scored tokens (``cream_jax.scoring.sequence_logprobs``), not
length-normalised, as in the official CREAM code (METHODS 2.3); SimPO and the optional IPO
normalisation divide by the lengths given.

Shape letters: B batch (pairs or sequences), T time, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")
_DIVERGENCES = ("skl", "bce", "mse")


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def sft_loss(logits, input_ids, loss_mask):
    """Next-token cross-entropy on the target tokens only (METHODS section 0, bug 2.7-4 fixed).

    Position t of ``logits`` predicts token t+1 of ``input_ids``; ``loss_mask[b, t] = 1`` marks token t
    as a target (so ``loss_mask[:, 0]`` is ignored: nothing predicts the first token).

    Args:
      logits: [B, T, V] model outputs (any float dtype; the softmax runs in float32).
      input_ids: [B, T] int token ids.
      loss_mask: [B, T] bool or {0, 1}: target tokens (the response and its end-of-turn token).

    Returns:
      (per_example_loss [B] float32: mean negative log-likelihood over the example's targets, 0 for an
      example without targets; n_tokens [B] float32: number of targets). The token-mean over a batch
      is ``sum(loss * n_tokens) / sum(n_tokens)``.
    """
    if logits.ndim != 3 or input_ids.shape != logits.shape[:2] or loss_mask.shape != input_ids.shape:
        raise ValueError(
            f"sft_loss: expected logits [B, T, V], input_ids and loss_mask [B, T]; got {logits.shape}, "
            f"{input_ids.shape}, {loss_mask.shape}"
        )
    logits = _f32(logits[:, :-1])  # [B, T-1, V]
    targets = input_ids[:, 1:]  # [B, T-1]
    mask = _f32(loss_mask[:, 1:])
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit  # [B, T-1]
    n_tokens = jnp.sum(mask, axis=-1)
    return jnp.sum(nll * mask, axis=-1) / jnp.maximum(n_tokens, 1.0), n_tokens


def _check_pair_shapes(fn: str, **arrays):
    shapes = {k: jnp.shape(v) for k, v in arrays.items() if v is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{fn}: per-pair inputs must share one shape [B]; got {shapes}")


def _pair_logit(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type,
                chosen_lengths, rejected_lengths, simpo_gamma):
    """The argument of the sigmoid (or of the IPO/hinge loss) per pair, [B] float32."""
    if loss_type == "simpo":
        # SimPO: reward = beta / |y| * log pi(y|x), no reference, target margin gamma:
        # -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)  (TRL CPOTrainer "simpo").
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("dpo_loss: loss_type='simpo' needs chosen_lengths and rejected_lengths")
        avg_c = _f32(chosen_logps) / jnp.maximum(_f32(chosen_lengths), 1.0)
        avg_r = _f32(rejected_logps) / jnp.maximum(_f32(rejected_lengths), 1.0)
        return beta * (avg_c - avg_r) - simpo_gamma
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"dpo_loss: loss_type={loss_type!r} needs ref_chosen_logps and ref_rejected_logps")
    chosen_ratio = _f32(chosen_logps) - _f32(ref_chosen_logps)
    rejected_ratio = _f32(rejected_logps) - _f32(ref_rejected_logps)
    if loss_type == "ipo" and chosen_lengths is not None:
        # TRL >= 1.x normalises IPO's log-ratios by the completion length (agreed with the IPO authors).
        if rejected_lengths is None:
            raise ValueError("dpo_loss: give both chosen_lengths and rejected_lengths, or neither")
        chosen_ratio = chosen_ratio / jnp.maximum(_f32(chosen_lengths), 1.0)
        rejected_ratio = rejected_ratio / jnp.maximum(_f32(rejected_lengths), 1.0)
    if loss_type in ("ipo", "hinge"):
        return chosen_ratio - rejected_ratio  # h (IPO Eq. 17) / the SLiC margin, without beta
    return beta * (chosen_ratio - rejected_ratio)  # Delta = m_theta(x, y+, y-) (METHODS 1)


def dpo_loss(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    *,
    beta: float = 0.1,
    label_smoothing=0.0,
    loss_type: str = "sigmoid",
    chosen_lengths=None,
    rejected_lengths=None,
    simpo_gamma: float = 0.5,
):
    """Per-pair loss of the DPO family.

    - "sigmoid" (DPO / conservative DPO, METHODS 1): with Delta = beta * [(logp(y+) - logp_ref(y+)) -
      (logp(y-) - logp_ref(y-))], ``-(1 - eps) log sigmoid(Delta) - eps log sigmoid(-Delta)``,
      eps = ``label_smoothing``; this is the soft-label loss L_soft with c = 1 - eps.
    - "ipo": ``(h - 1 / (2 beta))^2`` with h the difference of log-ratios (IPO Eq. 17); with lengths
      given, each log-ratio is divided by its length first (TRL's IPO).
    - "hinge" (SLiC): ``relu(1 - beta h)``.
    - "simpo": ``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)``, z = beta (logp(y+)/|y+| -
      logp(y-)/|y-|) - simpo_gamma; no reference (the ref_* arguments are ignored and may be None).

    Args:
      chosen_logps: [B] summed log-probs of the chosen responses under the policy.
      rejected_logps: [B] same for the rejected responses.
      ref_chosen_logps: [B] summed log-probs of the chosen responses under the reference.
      ref_rejected_logps: [B] same for the rejected responses.
      beta: inverse temperature (IPO's tau).
      label_smoothing: eps in [0, 1], a float or [B] (CREAM passes 1 - C per pair); sigmoid/simpo only.
      loss_type: "sigmoid" | "ipo" | "hinge" | "simpo".
      chosen_lengths: [B] scored-token counts of the chosen responses (simpo; optional for ipo).
      rejected_lengths: [B] same for the rejected responses.
      simpo_gamma: SimPO target reward margin gamma (TRL's default 0.5).

    Returns:
      losses [B] float32.
    """
    if loss_type not in _LOSS_TYPES:
        raise ValueError(f"dpo_loss: loss_type must be one of {_LOSS_TYPES}, got {loss_type!r}")
    if isinstance(label_smoothing, (int, float)):
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"dpo_loss: label_smoothing must lie in [0, 1], got {label_smoothing}")
        if label_smoothing and loss_type in ("ipo", "hinge"):
            raise ValueError(f"dpo_loss: label_smoothing is not defined for loss_type={loss_type!r}")
    _check_pair_shapes(
        "dpo_loss", chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
    )
    z = _pair_logit(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type,
                    chosen_lengths, rejected_lengths, simpo_gamma)
    if loss_type == "ipo":
        return (z - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - beta * z)
    eps = _f32(label_smoothing)
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def dpo_metrics(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    chosen_lengths=None,
    rejected_lengths=None,
):
    """Batch-mean DPO diagnostics under TRL's names.

    Rewards are the implicit rewards beta * (logp - logp_ref) (METHODS 1); for "simpo" they are
    beta * logp / |y| as in TRL's CPO/SimPO trainer.

    Args: as :func:`dpo_loss` (all [B]).

    Returns:
      dict of float32 scalars: "rewards/chosen", "rewards/rejected", "rewards/margins",
      "rewards/accuracies" (share of pairs with chosen reward > rejected reward), "logps/chosen",
      "logps/rejected".
    """
    if loss_type not in _LOSS_TYPES:
        raise ValueError(f"dpo_metrics: loss_type must be one of {_LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "simpo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("dpo_metrics: loss_type='simpo' needs chosen_lengths and rejected_lengths")
        r_c = beta * _f32(chosen_logps) / jnp.maximum(_f32(chosen_lengths), 1.0)
        r_r = beta * _f32(rejected_logps) / jnp.maximum(_f32(rejected_lengths), 1.0)
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"dpo_metrics: loss_type={loss_type!r} needs ref_chosen_logps and ref_rejected_logps")
        r_c = beta * (_f32(chosen_logps) - _f32(ref_chosen_logps))
        r_r = beta * (_f32(rejected_logps) - _f32(ref_rejected_logps))
    return {
        "rewards/chosen": jnp.mean(r_c),
        "rewards/rejected": jnp.mean(r_r),
        "rewards/margins": jnp.mean(r_c - r_r),
        "rewards/accuracies": jnp.mean((r_c > r_r).astype(jnp.float32)),
        "logps/chosen": jnp.mean(_f32(chosen_logps)),
        "logps/rejected": jnp.mean(_f32(rejected_logps)),
    }


def consistency_dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, consistency, beta=0.1):
    """CREAM's consistency-regularised DPO (METHODS 2.3, final training loss).

    ``C * (-log sigmoid(Delta)) + (1 - C) * (-log sigmoid(-Delta))``: weight C on the pair as ranked
    by the current model and 1 - C on the reversed pair; identical to ``dpo_loss`` with
    ``label_smoothing = 1 - C`` (Theorem 2's soft label). C = 1 is plain DPO (the SRLM baseline).

    Args:
      chosen_logps: [B] summed policy log-probs of y+ (the current model's best response).
      rejected_logps: [B] same for y- (the worst response).
      ref_chosen_logps: [B] reference (M_t) log-probs of y+.
      ref_rejected_logps: [B] reference log-probs of y-.
      consistency: [B] or scalar C in [0, 1] (per prompt for "dyn", the set average for "avg").
      beta: DPO beta (0.1 in CREAM).

    Returns:
      losses [B] float32.
    """
    c = jnp.broadcast_to(_f32(consistency), jnp.shape(chosen_logps))
    return dpo_loss(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta, label_smoothing=1.0 - c
    )


def _bernoulli_entropy(logit):
    """H(sigmoid(logit)) in nats, stable for any logit: H = p softplus(-l) + (1 - p) softplus(l)."""
    p = jax.nn.sigmoid(logit)
    return p * jax.nn.softplus(-logit) + (1.0 - p) * jax.nn.softplus(logit)


def scir_loss(
    logps_1,
    logps_2,
    ref_logps_1,
    ref_logps_2,
    p_gen,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    gamma: float = 0.0,
    divergence: str = "skl",
    eps: float = 1e-6,
    weight=None,
    tie_tolerance: float = 0.0,
):
    """SCIR per-step objective on unlabeled pairs (y1, y2) [MEM: METHODS 5.2 is a reconstruction].

    - implicit preference p_imp = sigmoid(Delta), Delta = beta [(logp(y1) - logp_ref(y1)) -
      (logp(y2) - logp_ref(y2))], reference M_t;
    - generative preference p_gen (the model as pairwise judge, e.g. ``judge.pairwise_preference``),
      clipped to [eps, 1 - eps]; it may carry gradients into the policy;
    - agreement mask: both probabilities strictly on the same side of 1/2 (recomputed every step,
      no gradient). A tie, |Delta| <= ``tie_tolerance`` (e.g. while policy == reference at the first
      step, where the two programs that computed the policy's and the reference's log-probs may differ
      by rounding), counts as disagreement, so no label is imposed before the consistency term has acted;
    - L_pref = DPO loss on the agreed pairs with the agreed label (y1 preferred iff p_imp > 1/2),
      averaged over the agreed pairs;
    - L_cons = D(p_imp, p_gen): "skl" KL(p_imp||p_gen) + KL(p_gen||p_imp) =
      (p_imp - p_gen)(logit p_imp - logit p_gen); "bce" -[p_gen log p_imp + (1 - p_gen) log(1 - p_imp)]
      (= KL(p_gen||p_imp) + H(p_gen), so it also sharpens the judge); "mse" (p_imp - p_gen)^2;
    - L_conf = H(p_imp) + H(p_gen) (Bernoulli entropies, the "confidence" penalty);
    - L = L_pref + alpha L_cons + gamma L_conf.

    Args:
      logps_1: [B] summed policy log-probs of y1.
      logps_2: [B] same for y2.
      ref_logps_1: [B] reference log-probs of y1.
      ref_logps_2: [B] reference log-probs of y2.
      p_gen: [B] probability in [0, 1] that the generative judge prefers y1.
      beta: DPO beta.
      alpha: weight of the consistency divergence.
      gamma: weight of the entropy (confidence) term.
      divergence: "skl" | "bce" | "mse".
      eps: clipping of p_gen before its logit.
      weight: optional [B] example weights (0 for padding rows); default all ones.
      tie_tolerance: |Delta| at or below which the implicit preference is a tie (no agreement).

    Returns:
      (losses [B] float32, metrics dict). The per-example preference term is scaled by
      sum(weight) / max(weighted #agreed, 1) so that the weighted mean
      ``sum(weight * losses) / sum(weight)`` (``losses.mean()`` without weights) equals L above, with
      L_pref averaged over the agreed pairs only. Metrics (weighted means over the batch):
      "scir/agreement" (share of agreed pairs), "scir/n_agreed", "scir/pref_loss",
      "scir/consistency_loss", "scir/entropy", "scir/p_imp", "scir/p_gen".
    """
    if divergence not in _DIVERGENCES:
        raise ValueError(f"scir_loss: divergence must be one of {_DIVERGENCES}, got {divergence!r}")
    _check_pair_shapes(
        "scir_loss", logps_1=logps_1, logps_2=logps_2, ref_logps_1=ref_logps_1, ref_logps_2=ref_logps_2, p_gen=p_gen,
        weight=weight,
    )
    if jnp.ndim(logps_1) != 1:
        raise ValueError(f"scir_loss: inputs must be [B] (a batch: agreement is normalised over it), got {jnp.shape(logps_1)}")
    delta = beta * ((_f32(logps_1) - _f32(ref_logps_1)) - (_f32(logps_2) - _f32(ref_logps_2)))
    p_imp = jax.nn.sigmoid(delta)
    p_gen = jnp.clip(_f32(p_gen), eps, 1.0 - eps)
    logit_gen = jnp.log(p_gen) - jnp.log1p(-p_gen)

    w = jnp.ones_like(delta) if weight is None else _f32(weight)
    w_sum = jnp.maximum(jnp.sum(w), 1e-12)
    agree = jax.lax.stop_gradient(((delta > tie_tolerance) & (p_gen > 0.5)) | ((delta < -tie_tolerance) & (p_gen < 0.5)))
    # Agreed label z = 1[p_imp > 1/2]: DPO on (y1, y2) if z else on (y2, y1), i.e. -log sigmoid(|Delta|).
    pref = -jax.nn.log_sigmoid(jnp.where(delta > 0, delta, -delta))
    n_agreed = jnp.sum(jnp.where(agree, w, 0.0))
    pref_term = jnp.where(agree, pref, 0.0) * (w_sum / jnp.maximum(n_agreed, 1e-12))

    if divergence == "skl":
        cons = (p_imp - p_gen) * (delta - logit_gen)
    elif divergence == "bce":
        cons = -(p_gen * jax.nn.log_sigmoid(delta) + (1.0 - p_gen) * jax.nn.log_sigmoid(-delta))
    else:
        cons = (p_imp - p_gen) ** 2
    ent = _bernoulli_entropy(delta) + _bernoulli_entropy(logit_gen)

    losses = pref_term + alpha * cons + gamma * ent

    def mean(v):
        return jnp.sum(w * v) / w_sum

    metrics = {
        "scir/agreement": n_agreed / w_sum,
        "scir/n_agreed": n_agreed,
        "scir/pref_loss": jnp.sum(jnp.where(agree, w * pref, 0.0)) / jnp.maximum(n_agreed, 1e-12),
        "scir/consistency_loss": mean(cons),
        "scir/entropy": mean(ent),
        "scir/p_imp": mean(p_imp),
        "scir/p_gen": mean(p_gen),
    }
    return losses, metrics
