"""The stage machine of one run: M0 -> M1 -> iterations t = 1..T, resumable.

Stage M0: the embedded tiny LLaMA is pre-trained on the synthetic corpus (an HF checkpoint is M0
as loaded). Stage M1: SFT on the seed set plus the method's SFT additions. Iteration t: rollout of
M_t -> log-prob table of the models the method names -> curate (rewards, consistency, pairs,
records) -> train M_t -> M_{t+1} with the method's loss and reference M_t -> evaluate -> checkpoint
and results. A restarted run on the same workdir resumes at the stage, iteration, phase and step
where it stopped. Everything runs on one ``jax.sharding.Mesh``; the models in play stay on it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
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
from jax.experimental import multihost_utils

from cream_jax import checkpoint, config as config_lib, evaluate, methods, metrics, sharding, steps, validate
from cream_jax.config import RunConfig
from cream_jax.data import natural, pipeline, sources, synthetic
from cream_jax.engine import programs
from cream_jax.engine.host import TokenSpec, decode_responses, sample_responses
from cream_jax.loop import curate as curate_lib, trainer as trainer_lib
from cream_jax.loop.logprobs import LogProbTable
from cream_jax.loop.rollout import make_rollout
from cream_jax.models import gguf, hf
from cream_jax.models.llama import Llama, LlamaConfig

log = logging.getLogger("cream_jax")


class CompileCounter:
    """Counts XLA compilations, so iterations >= 2 can be checked to add none."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


COMPILES = CompileCounter()


# ------------------------------------------------------------------------------------------------
# Task data: the embedded suite or files.


@dataclasses.dataclass(frozen=True)
class TaskData:
    pretrain_texts: list[dict]  # {"text": str} or {"messages": [...]} (rendered with the chat template)
    sft: list[list[dict]]  # seed chat message lists
    pools: list[list[dict]]  # per iteration: {"id", "messages", "task", "label"}
    tests: dict[str, list[dict]]  # task -> [{"id", "messages", "label", "task"}]
    verifier: Callable[[str, str, str], float] | None  # (task, label, response) -> reward in [0, 1]
    eft: tuple = ()  # judge-training examples (the built-in suite's or Data.eft_path's), for the methods' SFT additions


def load_task_data(cfg: RunConfig) -> TaskData:
    """The built-in suite (``Data.suite``) unless data files are configured (then no pretraining corpus, and
    EFT examples only from ``Data.eft_path``)."""
    data = cfg.data
    if data.sft_path is None:
        if data.suite == "embedded":
            suite_cfg = cfg.suite if cfg.suite is not None else synthetic.SuiteConfig()
            suite = synthetic.make_suite(dataclasses.replace(suite_cfg, num_iterations=max(cfg.iterations, 1)))
        elif data.suite == "natural":
            suite_cfg = cfg.natural if cfg.natural is not None else natural.NaturalConfig()
            suite = natural.make_suite(dataclasses.replace(suite_cfg, num_iterations=max(cfg.iterations, 1)))
        else:
            raise ValueError(f"config: Data.suite={data.suite!r}: expected 'embedded' or 'natural'")
        pools = [[{"id": p["id"], "messages": p["messages"], "task": p["task"], "label": p["answer"]} for p in pool]
                 for pool in suite.pool]
        tests = {task: [{"id": x["id"], "messages": [{"role": "user", "content": x["question"]}], "label": x["label"], "task": task}
                        for x in items] for task, items in suite.test.items()}
        return TaskData(list(suite.pretrain), [x["messages"] for x in suite.sft], pools, tests, synthetic.verify, tuple(suite.eft))
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
    eft = tuple(sources.load_judge_examples(data.eft_path, on_error=data.on_bad_row).items) if data.eft_path else ()
    return TaskData([], sft, pools, tests, synthetic.verify, eft)


def iteration_pool(cfg: RunConfig, data: TaskData, t: int) -> list[dict]:
    pool = data.pools[t - 1] if t - 1 < len(data.pools) else []
    return pool[: cfg.data.prompts_per_iteration] if cfg.data.prompts_per_iteration else pool


def _check_prompt_pools(cfg: RunConfig, tokenizer: Any, data: TaskData) -> None:
    """Empty pools and (with on_overflow="error") over-long prompts fail before any training starts."""
    for t in range(1, cfg.iterations + 1):
        pool = iteration_pool(cfg, data, t)
        if not pool:
            raise ValueError(f"data: the prompt pool of iteration {t} is empty")
        if cfg.data.on_overflow == "error":
            try:
                pipeline.encode_prompts(tokenizer, [p["messages"] for p in pool], cfg.data.max_prompt_len,
                                        on_overflow="error", ids=[p["id"] for p in pool])
            except ValueError as e:
                raise ValueError(f"iteration {t} prompts: {e} (Data.max_prompt_len; Data.on_overflow='truncate' "
                                 "cuts instead)") from None


# ------------------------------------------------------------------------------------------------
# The run context, created once.


@dataclasses.dataclass
class Run:
    """The run's fixed parts (config, mesh, tokenizer, data, method, stores) and the models on the mesh."""

    cfg: RunConfig
    method: methods.Method
    workdir: Path
    mesh: jax.sharding.Mesh
    tokenizer: Any
    tokens: TokenSpec
    model_config: LlamaConfig
    graphdef: Any
    data: TaskData
    ckpt: checkpoint.RunCheckpointer
    store: checkpoint.ModelStore
    writer: metrics.MetricWriter
    trainer: trainer_lib.Trainer = None
    save_counter: int = 0
    results: list = dataclasses.field(default_factory=list)
    setup_seconds: float = 0.0  # model load, data, mesh (for row 0)
    models: dict = dataclasses.field(default_factory=dict)  # name -> params resident on the mesh
    inputs: dict = dataclasses.field(default_factory=dict)  # rows skipped / truncated per source (validate.count_inputs)
    _cast: Any = None  # the compiled compute-dtype cast of scored-only models (scored_copy)

    def model(self, params) -> Llama:
        return nnx.merge(self.graphdef, params)

    def put_model(self, name: str, params) -> None:
        self.store.save(name, params)
        if self.cfg.keep_models_resident or name == "policy":
            self.keep_resident(name, params)

    def keep_resident(self, name: str, params) -> None:
        """Holds ``params`` on the mesh; with ``m{k}``, models older than M_{k-1} other than M0 are
        dropped: no method reads more than M0, M_{t-1} and M_t at iteration t (METHODS section 0),
        except with ``Reward.reward_reference = "previous"``, whose M_{t-1} ranking needs M_{t-2}:
        `get_model` reads that one from the store each iteration (slower, same scores).
        The older models kept (M0, M_{k-1}) are only scored from then on: they are held as their
        compute-dtype copy (`scored_copy`), M_k (the next policy, trained) as given."""
        self.models[name] = params
        if name.startswith("m") and name[1:].isdigit():
            k = int(name[1:])
            for old in [n for n in self.models if n.startswith("m") and n[1:].isdigit() and int(n[1:]) < k]:
                if 0 < int(old[1:]) < k - 1:
                    del self.models[old]
                else:
                    self.models[old] = self.scored_copy(self.models[old])

    def _scored_dtype(self):
        """The dtype of a model that is only scored: the compute dtype (Model.dtype) where it is
        narrower than the stored one (bf16 compute, fp32 masters: half the memory; the forward
        casts to it anyway, so the scores are the same); None where nothing is saved."""
        mc = self.model_config
        compute, stored = jnp.dtype(mc.jnp_dtype), jnp.dtype(mc.jnp_param_dtype)
        return compute if compute.itemsize < stored.itemsize else None

    def scored_copy(self, params):
        """``params`` in the compute dtype, each leaf on its sharding (`programs.make_cast_params`,
        compiled once per run); ``params`` itself where no narrower dtype applies."""
        dtype = self._scored_dtype()
        if dtype is None or all(x.dtype == dtype for x in jax.tree.leaves(params)
                                if jnp.issubdtype(x.dtype, jnp.floating)):
            return params
        if self._cast is None:
            self._cast = programs.make_cast_params(params, dtype)
        return self._cast(params)

    def get_model(self, name: str):
        """M_k by name for scoring: resident, or read from the store straight into the compute-dtype copy."""
        if name in self.models:
            return self.models[name]
        target = _abstract(self.models["policy"])
        dtype = self._scored_dtype()
        if dtype is not None:  # orbax casts while reading
            target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating)
                                                                else x.dtype, sharding=x.sharding), target)
        return self.store.load(name, target)

    def save(self, state: dict, progress: dict, extra: dict | None = None) -> None:
        # A checkpoint says which stages are done; the models they wrote must be on disk before it is
        # (a run killed in between would otherwise resume past a model that was never committed).
        self.store.wait()
        self.writer.flush()  # and the logs up to it: a SIGKILL loses nothing logged before a checkpoint
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
        if jax.process_count() > 1:
            # The primary process commits a multi-process checkpoint; nobody dies before it has.
            multihost_utils.sync_global_devices("cream_jax_kill_for_test")
        log.warning("CREAM_JAX_KILL_AT=%s: checkpoint %s committed; SIGKILL", target, ckpt.latest_step())
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
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
            pad_token_id=tok.pad_token_id, dtype=m.dtype, param_dtype=m.param_dtype,
        )
        graphdef, params = sharding.create_sharded(lambda: Llama(mc, rngs=nnx.Rngs(cfg.seed)), mesh)
        return tok, mc, nnx.merge(graphdef, params)
    # An HF folder, a .gguf file or a pkg: spec; the tokenizer comes with it unless Model.tokenizer is set.
    model, mc, tok = gguf.load_model_source(cfg.model.source, cfg.model.dtype, mesh, param_dtype=cfg.model.param_dtype,
                                            remat=cfg.model.remat)
    if cfg.model.tokenizer:
        tok = hf.load_tokenizer(cfg.model.tokenizer)
    return tok, mc, model


def _remat_mode(model: config_lib.ModelConfig) -> str:
    """Model.remat + Model.remat_policy as the train step's remat mode."""
    return model.remat_policy if model.remat else "none"


def setup(cfg: RunConfig, workdir: str | os.PathLike) -> tuple[Run, Any]:
    """Creates the run context (method, mesh, tokenizer, M0's initial params, writers, checkpointer)."""
    tic = time.perf_counter()
    inputs = validate.check_run(cfg, workdir)  # everything checked before anything is written
    method = methods.create(cfg)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint.check_run_matches(workdir, config_lib.fingerprint(cfg), config_lib.to_json_dict(cfg))
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
    sft_added = method.sft_examples(data.eft)
    inputs = validate.count_inputs(cfg, tok, data.sft, data.pools, data.tests, inputs, sft_added=sft_added)
    # Checked on what the method adds, not on the file: SCIR can build no pairs from a valid file
    # (no solutions, or all on one instruction).
    if method.learns_to_judge() and not sft_added:
        source = ("these data files bring no EFT examples (set Data.eft_path)" if not data.eft else
                  f"it could build no judge-training chats from the {len(data.eft)} EFT examples")
        log.warning("%s's M1 learns to judge, but %s: M1 gets no judge training (docs/data.md)", cfg.method, source)
    elif data.eft and not method.learns_to_judge() and cfg.data.eft_path:
        log.warning("Data.eft_path %s is ignored: %s's M1 does not learn to judge", cfg.data.eft_path, cfg.method)
    _check_prompt_pools(cfg, tok, data)
    run = Run(
        cfg=cfg, method=method, workdir=workdir, mesh=mesh, tokenizer=tok, tokens=TokenSpec.from_tokenizer(tok),
        model_config=mc, graphdef=graphdef, data=data,
        ckpt=checkpoint.RunCheckpointer(workdir / "checkpoints", max_to_keep=2),
        store=checkpoint.ModelStore(workdir / "models"), writer=metrics.MetricWriter(workdir / "logs"), inputs=inputs,
    )
    run.trainer = trainer_lib.Trainer(graphdef, mesh, run.writer, run.save, cfg.checkpoint_every, run.ckpt.directory,
                                      remat=_remat_mode(cfg.model), guard=cfg.guard)
    run.setup_seconds = time.perf_counter() - tic
    return run, params


# ------------------------------------------------------------------------------------------------
# Evaluation.


def evaluate_model(run: Run, params: Any, key: jax.Array, iteration: int) -> tuple[dict, list, float | None]:
    """Greedy accuracy per test set, a few (question, answer) samples for the log, and the answers'
    mean length in tokens. Every item's record (id, task, response, prediction, label, correct) goes
    to ``samples/eval_<iteration>.jsonl``, so accuracy can be split by item after the run."""
    cfg = run.cfg
    model = run.model(params)
    samples: list = []
    answer_tokens: list[int] = []

    def generate_fn(message_lists):
        ids, mask, _ = pipeline.encode_prompts(run.tokenizer, message_lists, cfg.data.max_prompt_len, on_overflow="truncate")
        toks, tmask = sample_responses(
            model, np.asarray(ids), np.asarray(mask), key=key, num_samples=1, max_new_tokens=cfg.eval.max_new_tokens,
            temperature=0.0, top_p=1.0, top_k=0, tokens=run.tokens, batch_size=cfg.eval.batch_size,
            layers=cfg.sampling.layers,
        )
        texts = [row[0] for row in decode_responses(run.tokenizer, toks, tmask)]
        answer_tokens.extend(np.asarray(tmask)[:, 0].sum(-1).tolist())
        if len(samples) < cfg.eval.num_logged_samples:
            samples.extend({"question": m[-1]["content"], "answer": t} for m, t in zip(message_lists, texts))
        return texts

    tests = run.data.tests
    if cfg.eval.num_per_task:
        tests = {k: v[: cfg.eval.num_per_task] for k, v in tests.items()}
    acc, outputs = evaluate.evaluate(generate_fn, tests, batch_size=cfg.eval.batch_size, return_outputs=True)
    metrics.log_eval_items(run.workdir, iteration, [{"task": task, **r} for task, rs in outputs.items() for r in rs])
    mean_tokens = float(np.mean(answer_tokens)) if answer_tokens else None
    return {k: float(v) for k, v in acc.items()}, samples[: cfg.eval.num_logged_samples], mean_tokens


# ------------------------------------------------------------------------------------------------
# One iteration's curation: rollout -> log-prob table -> curate.


def iteration_context(run: Run, t: int, policy: Any, key: jax.Array, rollout=None) -> methods.Context:
    """The method's view of iteration t (M_k on demand: k = t is ``policy``)."""

    def model(k: int) -> Llama:
        return run.model(policy if k == t else run.get_model(f"m{k}"))

    oracle = None
    if rollout is not None and run.data.verifier is not None and all(p.get("label") is not None for p in rollout.prompts):
        oracle = np.array([[run.data.verifier(p["task"], p["label"], y) for y in row]
                           for p, row in zip(rollout.prompts, rollout.texts)], np.float32)
    return methods.Context(t=t, cfg=run.cfg, tokenizer=run.tokenizer, tokens=run.tokens, key=key, model=model,
                           oracle=oracle, eft=run.data.eft)


def curate_iteration(run: Run, t: int, policy: Any, key: jax.Array) -> tuple[dict, dict]:
    """(records of the kept pairs, statistics) of iteration ``t`` with policy M_t."""
    cfg = run.cfg
    k_sample, k_method = jax.random.split(key)
    tic = time.perf_counter()
    rollout = make_rollout(run.model(policy), run.tokenizer, iteration_pool(cfg, run.data, t), key=k_sample,
                           sampling=cfg.sampling, data=cfg.data, tokens=run.tokens, t=t,
                           progress=lambda it: metrics.progress(it, desc=f"iter {t}: sample"))
    sample_seconds = time.perf_counter() - tic
    ctx = iteration_context(run, t, policy, k_method, rollout)
    tic = time.perf_counter()
    logps = LogProbTable(rollout.seqs, rollout.shape, ctx.model, cfg.reward.score_batch_size,
                         progress=lambda it, label: metrics.progress(it, desc=f"iter {t}: score {label}"))
    logps.score(run.method.models_to_score(t))
    score_seconds = time.perf_counter() - tic
    records, stats = curate_lib.curate(run.method, ctx, rollout, logps, num_logged_samples=cfg.eval.num_logged_samples)
    per_model = {f"score M{k}": sec for k, sec in sorted(logps.seconds.items())}
    stats["seconds"] = {"sample": sample_seconds, "score": score_seconds, **per_model, **stats["seconds"]}
    return records, stats


# ------------------------------------------------------------------------------------------------
# The loop.


def run_loop(cfg: RunConfig, workdir: str | os.PathLike) -> dict:
    """Runs (or resumes) the whole pipeline; returns the results dict also written to results.json."""
    total_tic = time.perf_counter()
    run, params0 = setup(cfg, workdir)
    run.models["policy"] = params0
    del params0  # held by `run` only, so the stages can let M0's float32 copy go (scored_copy)
    try:
        out = _run_stages(run)
    finally:  # pending asynchronous checkpoint writes finish (or fail) before the process exits
        _close_all(run.ckpt.close, run.store.close, run.writer.close)
    print(metrics.format_table(out))
    print(f"total {time.perf_counter() - total_tic:.1f}s; results in {run.workdir / 'results.json'}")
    return out


def _close_all(*closers) -> None:
    """Calls every closer; re-raises the first failure after the others ran. Inside a ``finally``
    it only raises when the stages did not (a stage's error is the one reported)."""
    first = None
    for close in closers:
        try:
            close()
        except Exception as e:  # noqa: BLE001 - re-raised below
            log.warning("clean-up: %s", e)
            first = first or e
    if first is not None and sys.exc_info()[1] is None:
        raise first


def _run_stages(run: Run) -> dict:
    cfg = run.cfg
    checkpoint.write_run_info(run.workdir, config_text=_config_text(cfg), config_hash=config_lib.fingerprint(cfg),
                              config=config_lib.to_json_dict(cfg),
                              git_hash=checkpoint.git_hash())
    params0 = run.models["policy"]  # the initial (or loaded) params
    resume = _load_resume(run, params0)
    progress = resume["progress"] if resume else {"stage": "pretrain", "iteration": 0, "phase": "train", "step": 0}
    run.results = list(progress.get("results", []))
    run.save_counter = int(progress.get("save_counter", 0))
    if resume:  # steps after the checkpoint are replayed: drop what the interrupted run logged of them
        run.writer.close()
        run.writer = run.trainer.writer = metrics.MetricWriter(
            run.workdir / "logs", purge_step=trainer_lib.global_step(progress, int(progress.get("step", 0)) + 1))
    key = jax.random.key(cfg.seed)
    abstract = _abstract(params0)

    def resume_at(stage: str, iteration: int = 0) -> dict | None:
        """The checkpoint's train state if it was taken inside this stage's training (handed over once:
        the trainer consumes it; a stage skipped because its model exists lets it go)."""
        nonlocal resume
        found = resume if (resume and progress["stage"] == stage and progress.get("iteration", 0) == iteration
                           and progress.get("phase") == "train") else None
        if found is not None or (resume and progress["stage"] == stage):
            resume = None  # a train state (params + optimizer moments) held past its stage is dead memory
        return found

    stage_seconds: dict[str, float] = {}  # of the stages this process ran (for row 0)
    # Stage M0: the embedded tiny LLaMA is pre-trained; an HF checkpoint is M0 as loaded.
    tic = time.perf_counter()
    if run.store.exists("m0"):
        m0 = run.store.load("m0", abstract)
    else:
        if cfg.model.source == "embedded":
            log.info("stage M0: pre-training the embedded tiny LLaMA (%d steps)", cfg.pretrain.steps)
            m0 = run.trainer.train(
                name="pretrain", loss_fn=steps.lm_loss, loss_key="lm", optim=cfg.pretrain.optim, params=params0,
                records=trainer_lib.pretrain_records(run.tokenizer, run.data.pretrain_texts, cfg.pretrain.seq_len),
                total_steps=cfg.pretrain.steps, progress_base={"stage": "pretrain"}, resume=resume_at("pretrain"),
                seed=cfg.seed)
            stage_seconds["pretrain"] = time.perf_counter() - tic
        else:
            m0 = params0
        run.put_model("m0", m0)
    resume_at("pretrain")  # done with: nothing later resumes into pre-training
    run.models["policy"] = m0  # the initial params (a random init for the embedded model) are not needed now
    del params0
    if cfg.keep_models_resident:
        run.keep_resident("m0", m0)
    # The baseline row: M0 as given (the embedded toy's M0 has never seen a chat, so it is skipped by default).
    evaluate_m0 = cfg.eval.m0 if cfg.eval.m0 is not None else cfg.model.source != "embedded"
    if evaluate_m0 and not any(r["iteration"] == -1 for r in run.results):
        tic = time.perf_counter()
        acc, samples, answer_tokens = evaluate_model(run, m0, key, -1)
        run.results.append({"iteration": -1, "model": "M0", "accuracy": acc, "reward_accuracy": None,
                            "consistency": None, "pairs_kept": None, "response_tokens": {"eval": answer_tokens},
                            "seconds": {"eval": time.perf_counter() - tic}})
        metrics.log_samples(run.workdir, -1, [{"eval": s} for s in samples])

    # Stage M1: SFT on the seed set and the method's additions (SRLM's EFT).
    tic = time.perf_counter()
    if run.store.exists("m1"):
        m1 = run.store.load("m1", abstract)
    else:
        chats = run.data.sft + run.method.sft_examples(run.data.eft)
        log.info("stage M1: SFT on %d examples (%d seed, %d added by %s)", len(chats), len(run.data.sft),
                 len(chats) - len(run.data.sft), cfg.method)
        m1 = run.trainer.train(
            name="sft", loss_fn=steps.lm_loss, loss_key="lm", optim=cfg.sft.optim, params=m0,
            records=trainer_lib.sft_records(run.tokenizer, chats, cfg.sft.max_len), epochs=cfg.sft.epochs,
            progress_base={"stage": "sft"}, resume=resume_at("sft"), seed=cfg.seed + 1)
        stage_seconds["sft"] = time.perf_counter() - tic
        run.put_model("m1", m1)
    resume_at("sft")
    run.models["policy"] = m1
    if cfg.keep_models_resident:
        run.keep_resident("m1", m1)
    del m0  # M0 stays only as run.models["m0"], its compute-dtype copy (or on disk)
    if not any(r["iteration"] == 0 for r in run.results):
        tic = time.perf_counter()
        acc, samples, answer_tokens = evaluate_model(run, m1, jax.random.fold_in(key, 0), 0)
        run.results.append({"iteration": 0, "model": "M1", "accuracy": acc, "reward_accuracy": None,
                            "consistency": None, "pairs_kept": None, "response_tokens": {"eval": answer_tokens},
                            "seconds": {"setup": run.setup_seconds, **stage_seconds, "eval": time.perf_counter() - tic},
                            "inputs": run.inputs})
        metrics.log_samples(run.workdir, 0, [{"eval": s} for s in samples])
        _write_outputs(run)
        run.save({}, {"stage": "iteration", "iteration": 1, "phase": "curate", "step": 0})

    # Iterations t = 1..T: M_t -> M_{t+1}.
    policy = m1
    for t in range(1, cfg.iterations + 1):
        if any(r["iteration"] == t for r in run.results) and not run.store.exists(f"m{t + 1}"):
            # Killed before its write committed (older versions), or a damaged snapshot moved aside:
            # the iteration is recomputed from M_t (same keys: the same M_{t+1}), and every later one.
            log.warning("resume: M%d, the output of iteration %d, is not in %s: iterations %d-%d run again",
                        t + 1, t, run.store.directory, t, cfg.iterations)
            run.results = [r for r in run.results if r["iteration"] < t]
            resume = None
        if any(r["iteration"] == t for r in run.results):
            policy = run.store.load(f"m{t + 1}", abstract)
            run.models["policy"] = policy
            if cfg.keep_models_resident:
                run.keep_resident(f"m{t + 1}", policy)
            continue
        policy = _run_iteration(run, t, policy, jax.random.fold_in(key, t), resume_at("iteration", t))
    return _write_outputs(run)


def _run_iteration(run: Run, t: int, policy: Any, it_key: jax.Array, res: dict | None) -> Any:
    """Curate -> train -> evaluate -> checkpoint for iteration t; returns M_{t+1}."""
    cfg = run.cfg
    compiles_before = COMPILES.count
    tic = time.perf_counter()
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
    new_policy = policy if not records else run.trainer.train(
        name=f"iter{t}/train", loss_fn=run.method.loss_fn(run.tokenizer), loss_key=("preference", cfg.method),
        records=records, optim=cfg.dpo.optim, params=policy, epochs=cfg.dpo.epochs,
        progress_base={"stage": "iteration", "iteration": t, "curate_stats": stats}, resume=res,
        seed=cfg.seed + 100 + t, exact_epochs=True)
    train_seconds = time.perf_counter() - tic
    tic = time.perf_counter()
    acc, samples, answer_tokens = evaluate_model(run, new_policy, jax.random.fold_in(it_key, 1), t)
    eval_seconds = time.perf_counter() - tic
    run.put_model(f"m{t + 1}", new_policy)
    if cfg.export_hf:
        hf.save_hf_llama(run.model(new_policy), run.model_config, run.workdir / "hf" / f"M{t + 1}",
                         dtype=cfg.model.export_dtype, tokenizer=run.tokenizer)  # dtype None: the master weights'
    run.models["policy"] = new_policy
    seconds = {**stats["seconds"], "train": train_seconds, "eval": eval_seconds}
    seconds["total"] = curate_seconds + train_seconds + eval_seconds
    row = {"iteration": t, "model": f"M{t + 1}", "accuracy": acc, "reward_accuracy": stats["reward_accuracy"],
           "reward_accuracy_pairs": stats["reward_accuracy_pairs"], "judge_parse_failures": stats["judge_parse_failures"],
           "consistency": None if stats["consistency"]["mean"] is None else  # no self-ranker (the oracle)
           {"mean": stats["consistency"]["mean"], "std": stats["consistency"]["std"]},
           "pairs_kept": stats["pairs_kept"], "pairs_dropped": stats["pairs_dropped"],
           # .get: curate stats checkpointed before this field existed resume without it
           "response_tokens": {"eval": answer_tokens, **stats.get("response_tokens", {})},
           "scored_models": stats["scored_models"], "prompts": stats["prompts"], "prompts_truncated": stats["prompts_truncated"],
           "method": stats.get("method", {}),
           "seconds": seconds,
           "compiles": COMPILES.count - compiles_before}
    run.results.append(row)
    metrics.log_samples(run.workdir, t, stats["samples"] + [{"eval": s} for s in samples])
    run.writer.scalars(t, {f"accuracy/{k}": v for k, v in acc.items()}
                       | {"consistency/mean": stats["consistency"]["mean"], "pairs/kept": stats["pairs_kept"]})
    _write_outputs(run)
    run.save({}, {"stage": "iteration", "iteration": t + 1, "phase": "curate", "step": 0})
    log.info("iteration %d done: accuracy %s; %d XLA compilations during it", t, acc, row["compiles"])
    return new_policy


def _abstract(params: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)


def _load_resume(run: Run, params_template: Any) -> dict | None:
    """The newest checkpoint, with any train state placed back on the mesh with its step's shardings."""
    if run.ckpt.latest_step() is None:
        return None
    template = steps.abstract_train_state(params_template, steps.make_optimizer(config_lib.OptimConfig()))
    # Records (any row count) replicated on the mesh: every process addresses its own devices' copy.
    host = sharding.replicated(run.mesh)

    def target(progress, saved):
        out = {}
        for name, sub in saved.items():
            if name == "train":
                out[name] = template
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
