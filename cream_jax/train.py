"""The generalized iterative self-rewarding loop, one SPMD program: ``python -m cream_jax.train``.

Stages: M0 (pre-train the embedded tiny LLaMA, or load an HF checkpoint) -> M1 (SFT on the seed
set) -> iterations t = 1..T, each: sample N responses per prompt with M_t; reward them; for CREAM
also rank them with M_{t-1}; consistency; pairs; train M_t -> M_{t+1} with the method's loss and
reference M_t (its log-probs come from the reward step); evaluate; checkpoint. ``method`` picks a
configuration of this one loop: "cream" | "srlm" | "sera" | "scir" | "dpo_oracle" (METHODS.md).

Everything runs on one ``jax.sharding.Mesh``; the models in play stay on it. A restarted run on
the same ``--workdir`` resumes at the stage, iteration, phase and step where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cream_jax import checkpoint, config as config_lib, curate, distributed, errors, evaluate, guards, metrics, rewards, sharding, steps, validate
from cream_jax.config import RunConfig
from cream_jax.data import pipeline, sources, synthetic
from cream_jax.models import hf
from cream_jax.models.llama import Llama, LlamaConfig

log = logging.getLogger("cream_jax")

DEFAULT_WORKDIR = "runs/default"


class NonFiniteLoss(errors.Divergence):
    """A train step produced NaN/inf; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------
# Compile hygiene: count XLA compilations so iterations >= 2 can be checked to add none.


class CompileCounter:
    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


_COMPILES = CompileCounter()


# ------------------------------------------------------------------------------------------
# Task data: the embedded suite or files.


@dataclasses.dataclass
class TaskData:
    pretrain_texts: list[dict]  # {"text": str} or {"messages": [...]} (rendered with the chat template)
    sft: list[list[dict]]  # chat message lists
    pools: list[list[dict]]  # per iteration: {"id", "messages", "task", "label"}
    tests: dict[str, list[dict]]  # task -> [{"id", "messages", "label", "task"}]
    verifier: Callable[[str, str, str], float] | None  # (task, label, response) -> reward in [0, 1]


def load_task_data(cfg: RunConfig) -> TaskData:
    """The embedded suite unless data files are configured (then no pretraining corpus)."""
    data = cfg.data
    if data.sft_path is None:
        suite_cfg = cfg.suite if cfg.suite is not None else synthetic.SuiteConfig()
        suite = synthetic.make_suite(dataclasses.replace(suite_cfg, num_iterations=max(cfg.iterations, 1)))
        sft = [x["messages"] for x in suite.sft]
        if cfg.method == "srlm":  # SRLM's M1 also learns to judge (METHODS 3.1: SFT on IFT + EFT)
            from cream_jax import judge  # noqa: PLC0415

            sft += [judge.judge_messages(e["instruction"], e["response"], cfg.reward.judge_template)
                    + [{"role": "assistant", "content": e["justification"]}]
                    for e in suite.eft]
        pools = [[{"id": p["id"], "messages": p["messages"], "task": p["task"], "label": p["answer"]} for p in pool]
                 for pool in suite.pool]
        tests = {task: [{"id": x["id"], "messages": [{"role": "user", "content": x["question"]}], "label": x["label"], "task": task}
                        for x in items] for task, items in suite.test.items()}
        return TaskData(list(suite.pretrain), sft, pools, tests, synthetic.verify)
    sft = [x["messages"] for x in sources.load_sft_chats(data.sft_path, on_error=data.on_bad_row).items]
    if len(data.prompt_paths) < cfg.iterations:
        raise ValueError(
            f"config: data.prompt_paths has {len(data.prompt_paths)} files, run.iterations={cfg.iterations} needs one per iteration"
        )
    pools = [[{"id": p["id"], "messages": p["messages"], "task": p.get("task"), "label": p.get("answer")}
              for p in sources.load_prompt_pool(path, on_error=data.on_bad_row).items] for path in data.prompt_paths]
    tests: dict[str, list[dict]] = {}
    for path in data.eval_paths:
        for item in sources.load_eval_set(path, on_error=data.on_bad_row).items:
            tests.setdefault(item.get("task") or Path(path).stem, []).append(item)
    return TaskData([], sft, pools, tests, synthetic.verify)


# ------------------------------------------------------------------------------------------
# The run context: everything a stage needs, created once.


@dataclasses.dataclass
class Run:
    cfg: RunConfig
    workdir: Path
    mesh: jax.sharding.Mesh
    tokenizer: Any
    tokens: curate.TokenSpec
    model_config: LlamaConfig
    graphdef: Any
    data: TaskData
    ckpt: checkpoint.RunCheckpointer
    store: checkpoint.ModelStore
    writer: metrics.MetricWriter
    step_fns: dict = dataclasses.field(default_factory=dict)
    save_counter: int = 0
    results: list = dataclasses.field(default_factory=list)
    models: dict = dataclasses.field(default_factory=dict)  # name -> params resident on the mesh
    inputs: dict = dataclasses.field(default_factory=dict)  # rows skipped / truncated per source (validate.count_inputs)

    # -- models ------------------------------------------------------------------------------
    def model(self, params) -> Llama:
        return nnx.merge(self.graphdef, params)

    def put_model(self, name: str, params) -> None:
        self.store.save(name, params)
        if self.cfg.keep_models_resident or name == "policy":
            self.models[name] = params

    def get_model(self, name: str):
        if name in self.models:
            return self.models[name]
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.models["policy"])
        return self.store.load(name, abstract)

    # -- checkpoints --------------------------------------------------------------------------
    def save(self, state: dict, progress: dict, extra: dict | None = None) -> None:
        self.save_counter += 1
        progress = {**progress, "results": self.results, "save_counter": self.save_counter}
        self.ckpt.save(self.save_counter, state, progress, extra or {})
        _maybe_kill_for_test(self.ckpt, progress)


def _maybe_kill_for_test(ckpt: checkpoint.RunCheckpointer, progress: dict) -> None:
    """Fault injection for the resume tests: ``CREAM_JAX_KILL_AT="stage:iteration:phase:step"``
    SIGKILLs this process right after the matching checkpoint is committed (no clean-up runs)."""
    target = os.environ.get("CREAM_JAX_KILL_AT")
    if target and target == f"{progress['stage']}:{progress.get('iteration', 0)}:{progress['phase']}:{progress['step']}":
        ckpt.wait()
        os.kill(os.getpid(), 9)


def _tokenizer_and_model(cfg: RunConfig, mesh) -> tuple[Any, LlamaConfig, Llama]:
    if cfg.model.source == "embedded":
        from cream_jax.data import tokenizer as tiny_tokenizer  # noqa: PLC0415

        tok = hf.load_tokenizer(cfg.model.tokenizer or tiny_tokenizer.EMBEDDED_TOKENIZER_DIR)
        m = cfg.model
        mc = LlamaConfig(
            vocab_size=len(tok), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
            num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_key_value_heads, max_position_embeddings=m.max_position_embeddings,
            rope_theta=m.rope_theta, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, dtype=m.dtype,
        )
        graphdef, params = sharding.create_sharded(lambda: Llama(mc, rngs=nnx.Rngs(cfg.seed)), mesh)
        return tok, mc, nnx.merge(graphdef, params)
    model, mc = hf.load_hf_llama(cfg.model.source, dtype=jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32, mesh=mesh)
    tok = hf.load_tokenizer(cfg.model.tokenizer or cfg.model.source)
    return tok, mc, model


def _check_prompt_pools(cfg: RunConfig, tokenizer: Any, data: TaskData) -> None:
    """Empty pools and (with on_overflow="error") over-long prompts fail before any training starts."""
    for t in range(1, cfg.iterations + 1):
        pool = data.pools[t - 1] if t - 1 < len(data.pools) else []
        if cfg.data.prompts_per_iteration:
            pool = pool[: cfg.data.prompts_per_iteration]
        if not pool:
            raise ValueError(f"data: the prompt pool of iteration {t} is empty")
        if cfg.data.on_overflow == "error":
            try:
                pipeline.encode_prompts(tokenizer, [p["messages"] for p in pool], cfg.data.max_prompt_len,
                                        on_overflow="error", ids=[p["id"] for p in pool])
            except ValueError as e:
                raise ValueError(f"iteration {t} prompts: {e} (Data.max_prompt_len; Data.on_overflow='truncate' "
                                 "cuts instead)") from None


def setup(cfg: RunConfig, workdir: str | os.PathLike) -> tuple[Run, Any]:
    """Creates the run context (mesh, tokenizer, M0's initial params, writers, checkpointer)."""
    inputs = validate.check_run(cfg, workdir)  # everything checked before anything is written
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fp = config_lib.fingerprint(cfg)
    checkpoint.check_run_matches(workdir, fp)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    tok, mc, model = _tokenizer_and_model(cfg, mesh)
    graphdef, params = nnx.split(model)
    longest = max(cfg.data.max_prompt_len + cfg.sampling.max_new_tokens, cfg.sft.max_len, cfg.pretrain.seq_len)
    if longest > mc.max_position_embeddings:
        raise ValueError(
            f"config: sequences of up to {longest} tokens (Data.max_prompt_len + Sampling.max_new_tokens, SFT.max_len, "
            f"Pretrain.seq_len) exceed the model's context of {mc.max_position_embeddings} (max_position_embeddings)"
        )
    data = load_task_data(cfg)
    inputs = validate.count_inputs(cfg, tok, data.sft, data.pools, data.tests, inputs)
    _check_prompt_pools(cfg, tok, data)
    run = Run(
        cfg=cfg, workdir=workdir, mesh=mesh, tokenizer=tok, tokens=curate.TokenSpec.from_tokenizer(tok),
        model_config=mc, graphdef=graphdef, data=data,
        ckpt=checkpoint.RunCheckpointer(workdir / "checkpoints", max_to_keep=2),
        store=checkpoint.ModelStore(workdir / "models"), writer=metrics.MetricWriter(workdir / "logs"), inputs=inputs,
    )
    return run, params


# ------------------------------------------------------------------------------------------
# Supervised-style training over host arrays (pre-training, SFT, preference training).


def _state_abstract(state: dict) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _step_fn(run: Run, kind: str, optim: config_lib.OptimConfig, params: Any):
    """(compiled step, optimizer) of a stage kind, built once per (kind, optimizer config) and reused
    across iterations, so iterations >= 2 compile nothing new."""
    key = (kind, optim)
    if key not in run.step_fns:
        cfg = run.cfg
        if kind == "lm":
            loss_fn = steps.lm_loss
        elif kind == "scir":
            from cream_jax import judge  # noqa: PLC0415

            verdict = judge.verdict_token_ids(run.tokenizer)
            loss_fn = steps.make_scir_loss(cfg.dpo.beta, cfg.reward.scir_alpha, cfg.reward.scir_gamma,
                                           cfg.reward.scir_divergence, verdict)
        else:
            loss_fn = steps.make_dpo_loss(cfg.dpo.beta, cfg.dpo.loss_type, cfg.dpo.label_smoothing)
        optimizer = steps.make_optimizer(optim)
        template = steps.init_train_state(params, optimizer, jax.random.key(0))
        train_step = steps.make_train_step(loss_fn, run.graphdef, optimizer, run.mesh,
                                           steps.state_shardings(template), optim.grad_accum)
        run.step_fns[key] = (train_step, optimizer)
    return run.step_fns[key]


def train_on_arrays(
    run: Run,
    *,
    name: str,
    kind: str,
    records: dict,
    optim: config_lib.OptimConfig,
    params: Any,
    epochs: int | None = None,
    total_steps: int | None = None,
    progress_base: dict,
    resume: dict | None = None,
    seed: int = 0,
) -> Any:
    """Trains ``params`` on ``records`` (host arrays with a common leading axis); returns new params.

    Checkpoints every ``run.cfg.checkpoint_every`` steps with the records (curated data) and the
    data-iterator state, so ``resume`` continues at the same step and the same next batch.
    """
    cfg = run.cfg
    n = next(iter(records.values())).shape[0]
    bs = optim.batch_size
    multiple = sharding.batch_multiple(run.mesh) * optim.grad_accum
    if bs % multiple:
        raise ValueError(f"config: {name} batch_size={bs} must be a multiple of data*fsdp*grad_accum={multiple}")
    if total_steps is None:
        total_steps = max(1, math.ceil(n / bs)) * (epochs or 1)
    train_step, optimizer = _step_fn(run, kind, optim, params)
    state = steps.init_train_state(params, optimizer, jax.random.key(seed))
    guard = guards.DivergenceGuard(cfg.guard, name, params, keep=run.ckpt.directory)
    loader = pipeline.make_loader(list(range(n)), bs, seed=seed, shuffle=True, num_epochs=None, drop_remainder=False)
    start = 0
    if resume is not None and int(resume["progress"].get("step", 0)) > 0:
        state = resume["state"]["train"]
        loader.set_state(resume["extra"]["loader"])
        start = int(resume["progress"]["step"])
    log_every = max(1, min(25, total_steps // 10))
    bar = metrics.progress(total=total_steps, desc=name, initial=start)
    last_metrics = None
    for step in range(start, total_steps):
        idx = np.asarray(next(loader), np.int64).reshape(-1)
        weight = np.zeros((bs,), np.float32)
        weight[: len(idx)] = 1.0
        idx = np.concatenate([idx, np.full(bs - len(idx), idx[0] if len(idx) else 0)])
        batch = {k: v[idx] for k, v in records.items()}
        batch["weight"] = weight
        batch = sharding.shard_batch(batch, run.mesh)
        batch["lr"] = jnp.asarray(steps.learning_rate(optim, step, total_steps), jnp.float32)
        state, m = train_step(state, batch)
        last_metrics = m
        if (step + 1) % log_every == 0 or step + 1 == total_steps:
            host = {k: float(v) for k, v in jax.device_get(m).items()}
            if not all(math.isfinite(v) for v in host.values()):
                raise NonFiniteLoss(f"{name}: non-finite metrics at step {step + 1}: {host}; last good checkpoint kept in {run.ckpt.directory}")
            guard.observe(step + 1, host)
            run.writer.scalars(_global_step(run, progress_base, step + 1), {f"{name}/{k}": v for k, v in host.items()})
            bar.set_postfix(loss=f"{host['loss']:.4f}")
        bar.update(1)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total_steps:
            _check_finite(run, name, state, step + 1)
            guard.check_params(step + 1, state["params"])
            saved = {"train": state} if progress_base["stage"] != "iteration" else {"train": state, "records": records}
            run.save(saved, {**progress_base, "phase": "train", "step": step + 1}, {"loader": loader.get_state()})
    bar.close()
    _check_finite(run, name, state, total_steps)
    guard.check_params(total_steps, state["params"])
    del last_metrics
    return state["params"]


def _check_finite(run: Run, name: str, state: dict, step: int) -> None:
    if not checkpoint.is_finite_tree(state["params"]):
        raise NonFiniteLoss(f"{name}: parameters became NaN/inf by step {step}; last good checkpoint kept in {run.ckpt.directory}")


def _global_step(run: Run, progress_base: dict, step: int) -> int:
    stage_offset = {"pretrain": 0, "sft": 1, "iteration": 2}[progress_base["stage"]] * 1_000_000
    return stage_offset + progress_base.get("iteration", 0) * 100_000 + step


# ------------------------------------------------------------------------------------------
# Records for the LM stages.


def pretrain_records(run: Run) -> dict:
    """The synthetic corpus, tokenized and packed into ``seq_len`` rows."""
    return pipeline.encode_corpus(run.tokenizer, run.data.pretrain_texts, run.cfg.pretrain.seq_len)


def sft_records(run: Run) -> dict:
    enc = pipeline.encode_sft(run.tokenizer, run.data.sft, run.cfg.sft.max_len, on_overflow="truncate")
    lost = int((np.asarray(enc["loss_mask"]).sum(axis=1) == 0).sum())
    if lost:  # e.g. SRLM's judge-training chats, whose rubric prompt alone can exceed SFT.max_len
        log.warning("%d of %d SFT examples have no response token left within SFT.max_len=%d: they teach nothing",
                    lost, len(run.data.sft), run.cfg.sft.max_len)
    return {k: np.asarray(enc[k], np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}


# ------------------------------------------------------------------------------------------
# Evaluation.


def evaluate_model(run: Run, params: Any, key: jax.Array) -> tuple[dict, list]:
    """Greedy accuracy per test set, plus a few (question, answer) samples for the log."""
    cfg = run.cfg
    model = run.model(params)
    samples: list = []

    def generate_fn(message_lists):
        ids, mask, _ = pipeline.encode_prompts(run.tokenizer, message_lists, cfg.data.max_prompt_len, on_overflow="truncate")
        toks, tmask = curate.sample_responses(
            model, np.asarray(ids), np.asarray(mask), key=key, num_samples=1, max_new_tokens=cfg.eval.max_new_tokens,
            temperature=0.0, top_p=1.0, top_k=0, tokens=run.tokens, batch_size=cfg.eval.batch_size,
        )
        texts = [row[0] for row in curate.decode_responses(run.tokenizer, toks, tmask)]
        if len(samples) < cfg.eval.num_logged_samples:
            samples.extend({"question": m[-1]["content"], "answer": t} for m, t in zip(message_lists, texts))
        return texts

    tests = run.data.tests
    if cfg.eval.num_per_task:
        tests = {k: v[: cfg.eval.num_per_task] for k, v in tests.items()}
    acc = evaluate.evaluate(generate_fn, tests, batch_size=cfg.eval.batch_size)
    return {k: float(v) for k, v in acc.items()}, samples[: cfg.eval.num_logged_samples]


# ------------------------------------------------------------------------------------------
# One self-rewarding iteration: curate (sample, score, reward, consistency, pairs).


def curate_iteration(run: Run, t: int, policy: Any, key: jax.Array) -> tuple[dict, dict]:
    """Returns (records of the kept pairs, statistics) for iteration ``t`` with policy M_t."""
    cfg = run.cfg
    pool = run.data.pools[t - 1]
    if cfg.data.prompts_per_iteration:
        pool = pool[: cfg.data.prompts_per_iteration]
    if not pool:
        raise ValueError(f"data: the prompt pool of iteration {t} is empty")
    timings: dict[str, float] = {}
    tic = time.perf_counter()
    try:
        prompt_ids, prompt_mask, n_trunc = pipeline.encode_prompts(
            run.tokenizer, [p["messages"] for p in pool], cfg.data.max_prompt_len, on_overflow=cfg.data.on_overflow,
            ids=[p["id"] for p in pool],
        )
    except ValueError as e:
        raise ValueError(f"iteration {t} prompts: {e} (Data.max_prompt_len; Data.on_overflow='truncate' cuts instead)") from None
    if n_trunc:
        log.warning("iteration %d: %d of %d prompts were longer than Data.max_prompt_len=%d and were left-truncated",
                    t, n_trunc, len(pool), cfg.data.max_prompt_len)
    prompt_ids, prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
    s = cfg.sampling
    k_sample, k_judge = jax.random.split(key)
    policy_model = run.model(policy)
    tokens, tmask = curate.sample_responses(
        policy_model, prompt_ids, prompt_mask, key=k_sample, num_samples=s.num_samples, max_new_tokens=s.max_new_tokens,
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, tokens=run.tokens, batch_size=s.batch_size,
        progress=lambda it: metrics.progress(it, desc=f"iter {t}: sample"),
    )
    timings["sample"] = time.perf_counter() - tic
    b, r = tokens.shape[:2]
    valid = tmask.sum(-1) > 0  # [B, R] an empty response cannot be scored
    seqs = pipeline.join_prompt_response(prompt_ids, prompt_mask, tokens, tmask)
    seqs = {k: np.asarray(v) for k, v in seqs.items()}

    # Score under M_t, and under the reward references (METHODS section 0: 3 forwards, not 4).
    tic = time.perf_counter()
    sb = cfg.reward.score_batch_size

    def logp(name_or_params, label):
        params = run.get_model(name_or_params) if isinstance(name_or_params, str) else name_or_params
        out = curate.score_sequences(run.model(params), seqs, sb,
                                     progress=lambda it: metrics.progress(it, desc=f"iter {t}: score {label}"))
        return out[0].reshape(b, r), out[1].reshape(b, r)

    lp_now, n_tok = logp(policy, f"M{t}")
    implicit_methods = ("cream", "sera", "scir")
    ref_name = "m0" if cfg.reward.reward_reference == "initial" else f"m{t - 1}"
    lp_ref = lp_prev = lp_prev_ref = None
    if cfg.method in implicit_methods or cfg.method in ("srlm", "dpo_oracle"):
        lp_ref = logp(ref_name, ref_name.upper())[0]
        if t >= 2:
            lp_prev = logp(f"m{t - 1}", f"M{t - 1}")[0] if ref_name != f"m{t - 1}" else lp_ref
            prev_ref_name = "m0" if cfg.reward.reward_reference == "initial" else f"m{t - 2}"
            lp_prev_ref = None if t - 1 == 0 else logp(prev_ref_name, prev_ref_name.upper())[0] if prev_ref_name != ref_name else lp_ref
    timings["score"] = time.perf_counter() - tic

    # Rewards: the current one ranks pairs; the previous one measures consistency.
    tic = time.perf_counter()
    texts = curate.decode_responses(run.tokenizer, tokens, tmask)
    oracle = None
    if run.data.verifier is not None and all(p.get("label") is not None for p in pool):
        oracle = np.array([[run.data.verifier(p["task"], p["label"], y) for y in row] for p, row in zip(pool, texts)], np.float32)
    r_impl_now = curate.implicit_reward(lp_now, lp_ref, n_tok)
    if t == 1:  # M0 has no reference: its ranking is its length-normalised likelihood (CREAM 2.7-1)
        lp_m0 = lp_ref if ref_name == "m0" else logp("m0", "M0")[0]
        r_prev = curate.implicit_reward(lp_m0, None, n_tok)
    else:
        r_prev = curate.implicit_reward(lp_prev, lp_prev_ref, n_tok)
    judge_failures = 0
    if cfg.method == "srlm":
        r_now, judge_failures = curate.judge_scores(
            policy_model, run.tokenizer, [p["messages"][-1]["content"] for p in pool], texts,
            readout=cfg.reward.judge_readout, key=k_judge, tokens=run.tokens, max_prompt_len=4 * cfg.data.max_prompt_len + 256,
            max_judgment_tokens=48, num_judgments=cfg.reward.judge_samples, batch_size=s.batch_size,
            template=cfg.reward.judge_template,
            progress=lambda it: metrics.progress(it, desc=f"iter {t}: judge"),
        )
        valid = valid & np.isfinite(r_now)
        r_now = np.nan_to_num(r_now, nan=0.0)
    elif cfg.method == "dpo_oracle":
        if oracle is None:
            raise ValueError("method=dpo_oracle needs a verifier and labelled prompts (the embedded suite has both)")
        r_now = oracle
    elif cfg.method == "sera" and t >= 2 and cfg.reward.sera_ensemble_weight < 1.0:
        r_now = np.asarray(rewards.ensemble([r_impl_now, r_prev], [cfg.reward.sera_ensemble_weight, 1 - cfg.reward.sera_ensemble_weight]))
    else:
        r_now = r_impl_now
    timings["reward"] = time.perf_counter() - tic

    tic = time.perf_counter()
    c, c_valid = curate.consistency_of(r_now, r_prev, valid, method=cfg.reward.consistency_method,
                                       level=cfg.reward.consistency_level, ties=cfg.reward.ties)
    pairs = curate.build_pairs(r_now, valid, tokens if cfg.reward.dedup else None, tmask if cfg.reward.dedup else None)
    keep = np.asarray(pairs.keep, bool)
    n_tied = int((~keep).sum())
    if cfg.method == "sera":
        keep = np.asarray(rewards_margin_select(pairs, keep, cfg.reward.sera_ratio))
    weight_c = c if cfg.method == "cream" else np.ones_like(c)
    records = curate.pair_records(seqs, pairs, keep, lp_now, weight_c, r)
    if cfg.method == "scir":
        records.update(scir_judge_records(run, pool, texts, pairs, keep))
    timings["pairs"] = time.perf_counter() - tic
    reward_acc, reward_acc_pairs = None, 0
    if oracle is not None:
        agreement = rewards.reward_accuracy(jnp.asarray(r_now), jnp.asarray(oracle), pairs)
        reward_acc = float(agreement.accuracy)
        reward_acc = None if math.isnan(reward_acc) else reward_acc  # no pair with a strict oracle preference
        reward_acc_pairs = int(agreement.n_compared)
    c_defined = c[c_valid] if c_valid.any() else c
    stats = {
        "consistency": {"mean": float(np.mean(c_defined)), "std": float(np.std(c_defined)), "undefined": int((~c_valid).sum())},
        "pairs_kept": int(keep.sum()), "pairs_tied": n_tied, "prompts": b, "prompts_truncated": int(n_trunc),
        "reward_accuracy": reward_acc, "reward_accuracy_pairs": reward_acc_pairs, "judge_parse_failures": judge_failures, "seconds": timings,
        "oracle_mean": None if oracle is None else float(oracle[valid].mean()),
        "samples": [{"prompt": pool[i]["messages"][-1]["content"], "responses": texts[i], "rewards": r_now[i].tolist(),
                     "chosen": int(pairs.chosen_idx[i]), "rejected": int(pairs.rejected_idx[i]), "kept": bool(keep[i])}
                    for i in range(min(b, cfg.eval.num_logged_samples))],
    }
    if not keep.any():
        log.warning("iteration %d: no preference pair survived (%d of %d prompts had tied rewards); M_%d is carried "
                    "over untrained. Raise Sampling.temperature or Sampling.num_samples.", t, n_tied, b, t)
    return records, stats


def rewards_margin_select(pairs: Any, keep: np.ndarray, ratio: float) -> np.ndarray:
    from cream_jax import preference  # noqa: PLC0415

    return np.asarray(preference.select_by_margin(jnp.asarray(pairs.margin), jnp.asarray(keep), ratio, largest=True))


def scir_judge_records(run: Run, pool: list, texts: list, pairs: Any, keep: np.ndarray) -> dict:
    """Pairwise judge prompts in both orders for every kept pair (SCIR's generative reward)."""
    from cream_jax import judge  # noqa: PLC0415

    idx = np.nonzero(keep)[0]
    out = {}
    max_len = 4 * run.cfg.data.max_prompt_len + 2 * run.cfg.sampling.max_new_tokens
    for name, first, second in (("judge12", pairs.chosen_idx, pairs.rejected_idx), ("judge21", pairs.rejected_idx, pairs.chosen_idx)):
        msgs = [(pool[i]["messages"][-1]["content"], texts[i][int(first[i])], texts[i][int(second[i])]) for i in idx]
        rendered = judge.render_pairwise_prompts(run.tokenizer, *zip(*msgs)) if msgs else []
        enc = curate.encode_texts_left_padded(run.tokenizer, rendered, max_len, what=f"SCIR pairwise judge prompts ({name})")
        out[f"{name}_ids"], out[f"{name}_mask"] = enc["input_ids"], enc["attention_mask"]
    return out


# ------------------------------------------------------------------------------------------
# The loop.


def run_loop(cfg: RunConfig, workdir: str | os.PathLike) -> dict:
    """Runs (or resumes) the whole pipeline; returns the results dict also written to results.json."""
    total_tic = time.perf_counter()
    run, params0 = setup(cfg, workdir)
    try:
        out = _run_stages(run, params0)
    finally:  # pending asynchronous checkpoint writes finish (or fail) before the process exits
        run.ckpt.close()
        run.store.close()
        run.writer.close()
    print(metrics.format_table(out))
    print(f"total {time.perf_counter() - total_tic:.1f}s; results in {run.workdir / 'results.json'}")
    return out


def _run_stages(run: Run, params0: Any) -> dict:
    cfg = run.cfg
    checkpoint.write_run_info(run.workdir, config_text=_config_text(cfg), config_hash=config_lib.fingerprint(cfg),
                              git_hash=checkpoint.git_hash())
    run.models["policy"] = params0
    resume = _load_resume(run, params0)
    progress = resume["progress"] if resume else {"stage": "pretrain", "iteration": 0, "phase": "train", "step": 0}
    run.results = list(progress.get("results", []))
    run.save_counter = int(progress.get("save_counter", 0))
    key = jax.random.key(cfg.seed)
    abstract = _abstract(params0)

    def resume_at(stage: str, iteration: int = 0) -> dict | None:
        """The checkpoint's train state if it was taken inside this stage's training."""
        if resume and progress["stage"] == stage and progress.get("iteration", 0) == iteration and progress.get("phase") == "train":
            return resume
        return None

    # Stage M0: the embedded tiny LLaMA is pre-trained; an HF checkpoint is M0 as loaded.
    if run.store.exists("m0"):
        m0 = run.store.load("m0", abstract)
    else:
        if cfg.model.source == "embedded":
            log.info("stage M0: pre-training the embedded tiny LLaMA (%d steps)", cfg.pretrain.steps)
            m0 = train_on_arrays(run, name="pretrain", kind="lm", records=pretrain_records(run), optim=cfg.pretrain.optim,
                                 params=params0, total_steps=cfg.pretrain.steps, progress_base={"stage": "pretrain"},
                                 resume=resume_at("pretrain"), seed=cfg.seed)
        else:
            m0 = params0
        run.put_model("m0", m0)
    if cfg.keep_models_resident:
        run.models["m0"] = m0

    # Stage M1: SFT on the seed set.
    if run.store.exists("m1"):
        m1 = run.store.load("m1", abstract)
    else:
        log.info("stage M1: SFT on %d seed examples", len(run.data.sft))
        m1 = train_on_arrays(run, name="sft", kind="lm", records=sft_records(run), optim=cfg.sft.optim, params=m0,
                             epochs=cfg.sft.epochs, progress_base={"stage": "sft"}, resume=resume_at("sft"), seed=cfg.seed + 1)
        run.put_model("m1", m1)
    run.models["policy"] = m1
    if cfg.keep_models_resident:
        run.models["m1"] = m1
    if not any(r["iteration"] == 0 for r in run.results):
        tic = time.perf_counter()
        acc, samples = evaluate_model(run, m1, jax.random.fold_in(key, 0))
        run.results.append({"iteration": 0, "model": "M1", "accuracy": acc, "reward_accuracy": None,
                            "consistency": None, "pairs_kept": None, "seconds": {"eval": time.perf_counter() - tic},
                            "inputs": run.inputs})
        metrics.log_samples(run.workdir, 0, [{"eval": s} for s in samples])
        _write_outputs(run)
        run.save({}, {"stage": "iteration", "iteration": 1, "phase": "curate", "step": 0})

    # Iterations t = 1..T: M_t -> M_{t+1}.
    policy = m1
    for t in range(1, cfg.iterations + 1):
        if any(r["iteration"] == t for r in run.results):
            policy = run.store.load(f"m{t + 1}", abstract)
            run.models["policy"] = policy
            if cfg.keep_models_resident:
                run.models[f"m{t + 1}"] = policy
            continue
        compiles_before = _COMPILES.count
        it_key = jax.random.fold_in(key, t)
        tic = time.perf_counter()
        res = resume_at("iteration", t)
        if res is not None:
            records = {k: np.asarray(v) for k, v in res["state"].get("records", {}).items()}
            stats = res["progress"]["curate_stats"]
        else:
            records, stats = curate_iteration(run, t, policy, it_key)
            if stats["pairs_kept"] == 0:
                records = {}
            run.save({"records": records}, {"stage": "iteration", "iteration": t, "phase": "train", "step": 0,
                                            "curate_stats": stats})
        curate_seconds = time.perf_counter() - tic
        tic = time.perf_counter()
        new_policy = policy if not records else train_on_arrays(
            run, name=f"iter{t}/train", kind="scir" if cfg.method == "scir" else "dpo", records=records,
            optim=cfg.dpo.optim, params=policy, epochs=cfg.dpo.epochs,
            progress_base={"stage": "iteration", "iteration": t, "curate_stats": stats}, resume=res,
            seed=cfg.seed + 100 + t)
        train_seconds = time.perf_counter() - tic
        tic = time.perf_counter()
        acc, samples = evaluate_model(run, new_policy, jax.random.fold_in(it_key, 1))
        eval_seconds = time.perf_counter() - tic
        run.put_model(f"m{t + 1}", new_policy)
        if cfg.export_hf:
            hf.save_hf_llama(run.model(new_policy), run.model_config, run.workdir / "hf" / f"M{t + 1}")
        run.models["policy"] = new_policy
        seconds = {**stats["seconds"], "train": train_seconds, "eval": eval_seconds}
        seconds["total"] = curate_seconds + train_seconds + eval_seconds
        row = {"iteration": t, "model": f"M{t + 1}", "accuracy": acc, "reward_accuracy": stats["reward_accuracy"],
               "reward_accuracy_pairs": stats["reward_accuracy_pairs"], "judge_parse_failures": stats["judge_parse_failures"],
               "consistency": {"mean": stats["consistency"]["mean"], "std": stats["consistency"]["std"]},
               "pairs_kept": stats["pairs_kept"], "pairs_tied": stats["pairs_tied"], "seconds": seconds,
               "prompts_truncated": stats["prompts_truncated"],
               "compiles": _COMPILES.count - compiles_before}
        run.results.append(row)
        metrics.log_samples(run.workdir, t, stats["samples"] + [{"eval": s} for s in samples])
        run.writer.scalars(t, {f"accuracy/{k}": v for k, v in acc.items()}
                           | {"consistency/mean": stats["consistency"]["mean"], "pairs/kept": stats["pairs_kept"]})
        _write_outputs(run)
        run.save({}, {"stage": "iteration", "iteration": t + 1, "phase": "curate", "step": 0})
        log.info("iteration %d done: accuracy %s; %d XLA compilations during it", t, acc, row["compiles"])
        policy = new_policy
    return _write_outputs(run)


def _abstract(params: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)


def _load_resume(run: Run, params_template: Any) -> dict | None:
    """The newest checkpoint, with any train state placed back on the mesh with its step's shardings."""
    if run.ckpt.latest_step() is None:
        return None
    template = steps.init_train_state(params_template, steps.make_optimizer(config_lib.OptimConfig()), jax.random.key(0))
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(progress, saved):
        out = {}
        for name, sub in saved.items():
            if name == "train":
                out[name] = _abstract(template)
            else:
                out[name] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=host), sub)
        return out

    state, progress, extra = run.ckpt.restore(None, target)
    log.info("resuming from checkpoint %s: stage=%s iteration=%s phase=%s step=%s", run.ckpt.restored_step,
             progress.get("stage"), progress.get("iteration"), progress.get("phase"), progress.get("step"))
    return {"state": state, "progress": progress, "extra": extra or {}}


def _write_outputs(run: Run) -> dict:
    results = {"config": config_lib.to_dict(run.cfg), "iterations": run.results}
    metrics.write_results(run.workdir, results["config"], run.results)
    metrics.plot_results(results, run.workdir / "results.png")
    return results


def _config_text(cfg: RunConfig) -> str:
    try:
        return config_lib.operative_config_text()
    except Exception:  # noqa: BLE001 — library use without gin
        return json.dumps(config_lib.to_dict(cfg), indent=2, default=str)


# ------------------------------------------------------------------------------------------
# CLI.


def main(argv: list[str] | None = None) -> int:
    """The CLI; every failure is one ``error: <what>: <why>`` line and its exit code (cream_jax.errors)."""
    return errors.run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cream_jax.train", description=__doc__.splitlines()[0])
    parser.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable); default configs/tiny_cpu.gin")
    parser.add_argument("--gin_param", action="append", default=[], help="gin binding, e.g. 'DPO.beta = 0.05' (repeatable)")
    parser.add_argument("--workdir", default=None, help=f"run directory (checkpoints, logs, results); default {DEFAULT_WORKDIR}")
    parser.add_argument("--coordinator_address", default=None, help="host:port of process 0 (env JAX_COORDINATOR_ADDRESS)")
    parser.add_argument("--num_processes", type=int, default=None, help="processes in the run (env JAX_NUM_PROCESSES)")
    parser.add_argument("--process_id", type=int, default=None, help="this process's id (env JAX_PROCESS_ID)")
    args = parser.parse_args(argv)
    _setup_logging()
    # Reruns and resumes reuse compiled programs (JAX's persistent cache; JAX_COMPILATION_CACHE_DIR overrides).
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(Path.home() / ".cache" / "cream_jax" / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    files = args.gin_file or default_gin_files()
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    config_lib.parse_gin(files, args.gin_param)
    validate.check_gin_bindings()
    cfg = config_lib.build_run_config()
    run_loop(cfg, args.workdir or DEFAULT_WORKDIR)
    return 0


def _setup_logging() -> None:
    """Our own handler: absl (imported by orbax) may already own the root logger."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def default_gin_files() -> list[str]:
    """configs/tiny_cpu.gin from a source checkout; none in a wheel (the defaults are the same run)."""
    candidate = Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.gin"
    return [str(candidate)] if candidate.exists() else []


if __name__ == "__main__":
    sys.exit(main())
