# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # cream_jax quickstart: one CREAM iteration, stage by stage
#
# CREAM (Consistency Regularized Self-Rewarding Language Models, arXiv 2410.12735) lets one LLM be
# both the policy and its own reward model. Each iteration samples N responses per unlabeled prompt,
# ranks them with the DPO *implicit reward* of the current model M_t, ranks them again with the
# previous model, measures how well the two rankings agree (the consistency C, a Kendall tau
# scaled to [0, 1]), and trains M_t with DPO on best-vs-worst pairs where each pair is
# weighted by C (METHODS.md section 2.2 has the algorithm and section 2.3 the equations).
#
# This notebook runs one such iteration, one library call per stage, so you can look at every
# intermediate array. The calls are the loop's own (`cream_jax.loop`: rollout, log-prob table,
# curate, trainer) and the method's hooks (`cream_jax.methods.cream`): the whole loop,
# `python -m cream_jax.train` (see README.md), chains exactly these.
#
# **Model.** With a network connection, `MODEL` (an HF hub id of a LLaMA-architecture checkpoint,
# or a local folder) is loaded with `cream_jax.models.hf.load_hf_llama`. Offline, or if the download
# fails, the notebook uses the embedded tiny LLaMA and tokenizer instead and pre-trains it for a
# few steps on the embedded synthetic task suite: that keeps it runnable on a laptop CPU in about
# a minute, but such a tiny model's responses are mostly noise.

# %%
# Colab: install cream_jax first (set CREAM_JAX_PIP to your clone's git URL; on a GPU or TPU
# runtime, install the accelerator build of the pinned jax version afterwards). The guard keeps
# this cell a no-op outside Colab, e.g. when the tests execute the notebook.
import importlib.util
import subprocess
import sys

CREAM_JAX_PIP = "cream_jax[notebook] @ git+https://github.com/YOUR_ORG/cream_jax.git"
if "google.colab" in sys.modules and importlib.util.find_spec("cream_jax") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", CREAM_JAX_PIP], check=True)

# %% tags=["parameters"]
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # HF hub id or local folder (LLaMA architecture)
NUM_PROMPTS = 32  # prompts of the iteration
NUM_TRAIN_STEPS = 8  # CREAM steps on the curated pairs
SEED = 0

# %%
import math
import os
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from cream_jax import config as config_lib
from cream_jax import sharding, steps
from cream_jax.engine import batching
from cream_jax.loop import curate, stages
from cream_jax.loop.logprobs import LogProbTable
from cream_jax.loop.rollout import make_rollout

print("jax", jax.__version__, "devices:", jax.devices())

# %% [markdown]
# ## 1. Set-up: the model M0 and the configuration
#
# The configuration is the trainer's own (frozen dataclasses bound by gin, `cream_jax/config.py`):
# the bindings below are a minute-scale variant of `configs/tiny_cpu.gin`. An HF checkpoint is
# fetched with `huggingface_hub.snapshot_download` (safetensors and tokenizer files only) unless
# `HF_HUB_OFFLINE=1`. Either way the SFT seed set and the prompts come from the embedded synthetic
# suite (short arithmetic and multiple-choice questions); `Data.sft_path` and `Data.prompt_paths`
# bind your own files instead (README.md). `stages.setup` builds the mesh over all devices, loads
# the tokenizer and M0's initial parameters, and picks the method (`run.method`, CREAM here).

# %%
def fetch_checkpoint(model: str) -> str | None:
    """A local folder holding ``model``, or None when it cannot be had (offline, no network)."""
    if os.path.isdir(model):
        return model
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        print("HF_HUB_OFFLINE=1: using the embedded tiny model")
        return None
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    except Exception as e:  # noqa: BLE001 — any failure (no network, unknown id) falls back
        print(f"could not fetch {model} ({type(e).__name__}: {e}); using the embedded tiny model")
        return None


checkpoint_dir = fetch_checkpoint(MODEL)
bindings = [
    "Run.method = 'cream'",
    "Run.iterations = 1",
    f"Run.seed = {SEED}",
    "Run.checkpoint_every = 0",  # no mid-phase checkpoints in a notebook
    # The embedded synthetic suite: pre-training corpus, SFT seed set, prompts, test questions.
    "Suite.num_pretrain = 400",
    "Suite.num_sft = 32",
    f"Suite.pool_per_iteration = {NUM_PROMPTS}",
    "Suite.num_test = 8",
    "SFT.epochs = 1",
    "Sampling.num_samples = 4",  # N (CREAM: 5)
    f"Sampling.batch_size = {NUM_PROMPTS}",
    "DPO.beta = 0.1",
]
if checkpoint_dir is None:
    # The embedded tiny LLaMA, pre-trained below at a high learning rate. Pre-training and SFT
    # share one optimizer setting and row length, hence one compiled train step.
    bindings += [
        "Model.source = 'embedded'",
        "Model.hidden_size = 64",
        "Model.intermediate_size = 128",
        "Model.num_hidden_layers = 2",
        "Model.num_attention_heads = 4",
        "Model.num_key_value_heads = 2",
        "Data.max_prompt_len = 80",  # the longest embedded prompt is 65 tokens
        "Pretrain.steps = 30",
        "Pretrain.seq_len = 96",
        "PretrainOptim.learning_rate = 2e-3",
        "PretrainOptim.batch_size = 8",
        "SFT.max_len = 96",
        "SFTOptim.learning_rate = 2e-3",
        "SFTOptim.batch_size = 8",
        "Sampling.temperature = 1.0",  # more spread among the responses of a barely trained model
        "Sampling.top_p = 1.0",
        "Sampling.max_new_tokens = 16",
        f"Reward.score_batch_size = {NUM_PROMPTS * 4}",
        "DPOOptim.learning_rate = 1e-3",
    ]
else:
    # A real checkpoint: CREAM's sampling (METHODS 2.4), small learning rates, room for a system
    # turn in the chat template, and 4 micro-batches per DPO step so that the float32 logits of
    # a large vocabulary ([rows, T, V]) fit on one GPU.
    bindings += [
        f"Model.source = {checkpoint_dir!r}",
        "Data.max_prompt_len = 160",
        "SFT.max_len = 256",
        "SFTOptim.learning_rate = 1e-5",
        "SFTOptim.batch_size = 8",
        "Sampling.temperature = 0.8",
        "Sampling.top_p = 0.95",
        "Sampling.max_new_tokens = 64",
        "Reward.score_batch_size = 16",
        "DPOOptim.learning_rate = 1e-5",
        "DPOOptim.grad_accum = 4",
    ]
config_lib.parse_gin([], bindings)
cfg = config_lib.build_run_config()
run, params0 = stages.setup(cfg, tempfile.mkdtemp(prefix="cream_quickstart_"))
print("model:", cfg.model.source, "|", run.model_config.num_hidden_layers, "layers,",
      run.model_config.hidden_size, "wide, vocab", run.model_config.vocab_size)
print("mesh:", dict(run.mesh.shape), "| method:", run.method.name)

# %% [markdown]
# ## 2. M0 and M1
#
# An HF checkpoint is M0 as loaded. The embedded tiny LLaMA starts from random weights, so it is
# first pre-trained on the synthetic corpus. M1 is then M0 fine-tuned on the labeled seed set
# (SFT on the response tokens only, METHODS section 0, plus the method's SFT additions: none for
# CREAM). Both go through `run.trainer.train`, the loop's own trainer; `run.put_model` keeps them
# on the mesh under the names the later stages ask for (M_k is "m{k}").

# %%
from cream_jax.loop import trainer

if cfg.model.source == "embedded":
    m0 = run.trainer.train(
        name="pretrain", loss_fn=steps.lm_loss, loss_key="lm", optim=cfg.pretrain.optim, params=params0,
        records=trainer.pretrain_records(run.tokenizer, run.data.pretrain_texts, cfg.pretrain.seq_len),
        total_steps=cfg.pretrain.steps, progress_base={"stage": "pretrain"}, seed=cfg.seed,
    )
else:
    m0 = params0
sft_chats = run.data.sft + run.method.sft_examples(run.data.eft)
m1 = run.trainer.train(
    name="sft", loss_fn=steps.lm_loss, loss_key="lm", optim=cfg.sft.optim, params=m0,
    records=trainer.sft_records(run.tokenizer, sft_chats, cfg.sft.max_len), epochs=cfg.sft.epochs,
    progress_base={"stage": "sft"}, seed=cfg.seed + 1,
)
run.put_model("m0", m0)
run.put_model("m1", m1)
print(f"M0 and M1 ready ({len(sft_chats)} SFT examples)")

# %% [markdown]
# ## 3. The rollout: N responses per prompt from M1
#
# The prompts of iteration 1 are rendered with the chat template (generation header included)
# and left-padded; `make_rollout` calls the jitted KV-cache sampler (`cream_jax.sampling.generate`)
# and returns the rollout every later stage reads: `tokens [B, R, S]` with a mask that ends at the
# first end-of-turn token (METHODS 2.2 a), the joined (prompt, response) rows and the texts.

# %%
pool = run.data.pools[0][:NUM_PROMPTS]
key = jax.random.key(cfg.seed)
rollout = make_rollout(run.model(m1), run.tokenizer, pool, key=key, sampling=cfg.sampling, data=cfg.data,
                       tokens=run.tokens, t=1)
B, R = rollout.shape
print(f"prompts B={B} (truncated: {rollout.prompts_truncated}), responses per prompt R={R}, "
      f"tokens {rollout.tokens.shape}")
for i in range(2):
    print(f"\nprompt {i}: {rollout.instructions[i]!r}")
    for j, text in enumerate(rollout.texts[i]):
        print(f"  response {j}: {text!r}")

# %% [markdown]
# ## 4. The log-prob table: each model the method names scores the rollout once
#
# CREAM at t = 1 with the default reward reference M0 ("initial", METHODS section 0) names M1 and
# M0: two forwards over the `[B * R, T]` joined rows, each returning the summed log-probability of
# the response tokens. The M1 log-probs double as the DPO reference log-probs later, so no third
# forward is needed. A method that does not rank with log-probs (SRLM's judge, the oracle) names
# M_t alone.

# %%
method = run.method
ctx = stages.iteration_context(run, 1, m1, jax.random.fold_in(key, 1), rollout)
needed = method.models_to_score(1)
logps = LogProbTable(rollout.seqs, rollout.shape, ctx.model, cfg.reward.score_batch_size).score(needed)
print("models scored:", sorted(f"M{k}" for k in needed))
print("log p_M1(y|x) of prompt 0:", np.round(logps[1][0], 2))
print("log p_M0(y|x) of prompt 0:", np.round(logps[0][0], 2))
print("response lengths of prompt 0:", logps.n_tokens[0])

# %% [markdown]
# ## 5. Rewards: the current ranking and the previous one
#
# `method.rewards` turns the table into the current reward, M1's DPO implicit reward
# `r = log p_M1(y|x) - log p_M0(y|x)` (no beta: a ranking does not depend on it; METHODS 2.2 b),
# and the same ranker one iteration earlier. The previous model is M0 itself, which has no
# reference to form an implicit reward with, so its ranking is its length-normalised likelihood
# `log p_M0(y|x) / |y|` (METHODS 2.2 c and 2.7-1).

# %%
rewards = method.rewards(ctx, rollout, logps)
r_now, r_prev = rewards.current, rewards.previous  # [B, R] each
valid = rollout.valid  # [B, R] an empty response has no score
print("r_now  (prompt 0):", np.round(r_now[0], 3))
print("r_prev (prompt 0):", np.round(r_prev[0], 3))

# %% [markdown]
# ## 6. Consistency per prompt
#
# `C_j = (tau_j + 1) / 2` with `tau_j` the Kendall tau-b of the two rankings of prompt j's responses
# (METHODS 2.3; per prompt = CREAM's "dyn" level; tau-b handles tied rewards, METHODS section 0). A
# prompt where tau is undefined (fewer than two distinct valid rewards) gets the average of the
# others.

# %%
c, c_valid = curate.consistency_of(
    r_now, r_prev, valid, method=cfg.reward.consistency_method, level=method.consistency_level, ties=cfg.reward.ties,
)
print("consistency C per prompt:", np.round(c, 3))
print(f"mean C = {c[c_valid].mean():.3f} over {int(c_valid.sum())} prompts with a defined tau")

# %% [markdown]
# ## 7. Preference pairs
#
# For each prompt the best response under the *current* reward is chosen and the worst one
# rejected (METHODS 2.2 e); prompts whose rewards are all tied, or whose responses are all
# identical, are dropped. `method.select` decides which pairs train and with which soft label
# (CREAM: every pair, at its C); `curate.pair_records` gathers them into the arrays the train
# step reads, with M1's log-probs as the DPO reference. `curate.curate` is these steps in one call.

# %%
pairs = curate.build_pairs(r_now, valid, rollout.tokens, rollout.token_mask)
selection = method.select(ctx, rollout, rewards, pairs, c)
records = curate.pair_records(rollout.seqs, selection.pairs, logps[1], selection.weight, R)
keep = np.asarray(selection.pairs.keep)
margins = np.asarray(selection.pairs.margin)[keep]
print(f"pairs kept: {int(keep.sum())} of {B} prompts")
print("reward margins of the kept pairs:", np.round(margins, 3))
same_records, stats = curate.curate(method, ctx, rollout, logps)
assert all(np.array_equal(records[k], same_records[k]) for k in records)
print("drops by reason:", stats["pairs_dropped"])

# %% [markdown]
# ## 8. Plots: the consistency distribution and the reward margins

# %%
fig, (ax_c, ax_m) = plt.subplots(1, 2, figsize=(10, 3.5))
ax_c.hist(c[c_valid], bins=np.linspace(0, 1, 11), color="tab:blue", edgecolor="white")
ax_c.set(title="per-prompt consistency C (M1 vs M0)", xlabel="C = (tau + 1) / 2", ylabel="prompts")
ax_m.hist(margins, bins=10, color="tab:orange", edgecolor="white")
ax_m.set(title="reward margin of the kept pairs", xlabel="r(y+) - r(y-)", ylabel="pairs")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 9. CREAM training steps
#
# The loss of one pair is `C * DPO(y+, y-) + (1 - C) * DPO(y-, y+)` with
# `DPO(a, b) = -log sigmoid(beta * [(log pi(a) - log pi_ref(a)) - (log pi(b) - log pi_ref(b))])`
# and reference M1 (METHODS 2.3, 2.2 f). At the first step the policy is the reference, so every
# pair's loss is `log 2`; it can fall only to the pair's binary entropy `H(C)` (reached where
# `sigmoid(Delta) = C`), so a pair whose two rankings are unrelated (C near 0.5) barely moves the
# model, and a pair ranked in reverse by M0 (C < 0.5) is trained towards the reversed order.
#
# The loss is the method's (`method.loss_fn`) inside the trainer's own jitted, sharded step
# (`cream_jax.steps`); all kept pairs form one batch here, padded to a multiple of the mesh's batch
# axes (padding rows get weight 0), and the same batch is stepped on several times to show the
# loss falling. `run.trainer.train` would instead visit each pair once per epoch.

# %%
optim = cfg.dpo.optim
loss_fn = method.loss_fn(run.tokenizer)
optimizer = steps.make_optimizer(optim)
state = steps.init_train_state(m1, optimizer, jax.random.key(cfg.seed))
train_step = steps.make_train_step(loss_fn, run.graphdef, optimizer, run.mesh, steps.state_shardings(state),
                                   optim.grad_accum)

n_pairs = len(next(iter(records.values())))
multiple = sharding.batch_multiple(run.mesh) * optim.grad_accum
rows = -(-n_pairs // multiple) * multiple  # padding rows (a copy of the last pair) get weight 0
weight = (np.arange(rows) < n_pairs).astype(np.float32)
batch = batching.to_global({**batching.pad_rows(records, rows), "weight": weight}, run.mesh)
history = []
for step in range(NUM_TRAIN_STEPS):
    lr = jnp.asarray(steps.learning_rate(optim, step, NUM_TRAIN_STEPS), jnp.float32)
    state, metrics = train_step(state, {**batch, "lr": lr})
    m = jax.device_get(metrics)
    history.append(float(m["loss"]))
    print(f"step {step}: loss {m['loss']:.4f}  margin {m['rewards/margins']:+.4f}  "
          f"accuracy {m['rewards/accuracies']:.2f}  mean C {m['consistency/weight']:.3f}")
print(f"loss {history[0]:.6f} (log 2 = {math.log(2):.6f}) -> {history[-1]:.6f}")
m2 = state["params"]  # M2, the policy of the next iteration

# %% [markdown]
# ## Next
#
# `python -m cream_jax.train` runs the whole pipeline (M0, M1, then T iterations with evaluation,
# checkpoints and resumption); `--gin_file configs/srlm.gin`, `sera.gin` or `scir.gin` switch
# the method (README.md).
