"""Meta-Rewarding (Wu et al. 2024, "Meta-Rewarding Language Models: Self-Improving Alignment with
LLM-as-a-Meta-Judge", arXiv 2407.19594): the policy M_t is actor, judge and meta-judge at once.

One iteration:
  1. actor: the rollout (N responses per prompt).
  2. judge: K judgments per response sampled from M_t with the LLM-as-a-Judge prompt (SRLM's,
     ``MetaRewarding.judge_template``); the reward is the mean of the parsed "Score: k" (SRLM).
     Actor pairs: best vs worst response by that reward, ties dropped (the generic pairs).
  3. meta-judge: for each prompt, the response whose judgments disagree most (the largest
     variance of the parsed scores, >= 2 parsed, variance > 0) has every ordered pair (j, k) of
     its parsed judgments compared by M_t with the meta-judge prompt below, shown as judgment 1 =
     j and judgment 2 = k; the verdict is sampled from the reply's first token renormalised over
     {"1", "2"} (one forward, like judge.py's pairwise read-out; the paper samples meta-judgments). Battle counting with positional weights: a win from the
     first position counts w_first = (verdicts for position 2) / (all verdicts), a win from the
     second position w_second = (verdicts for position 1) / (all verdicts), counted over all
     battles of the iteration, so a meta-judge that always answers "1" decides nothing:
        B[j, k] = w_first * win_first[j, k] + w_second * (1 - win_first[k, j]),  wins_j = sum_k B[j, k]
     The judge pair is (argmax wins, argmin wins) (first occurrence) for that judge prompt; it is
     dropped when the two have equal wins, give the same score, or are the same text.
  4. train: DPO (reference M_t) on the actor pairs plus the judge pairs (judge prompt -> chosen vs
     rejected judgment). Each judge pair rides with one actor pair's record row (the i-th judge
     pair with the i-th kept actor pair; judge pairs beyond the actor pairs are dropped, counted);
     in every train batch at most ``MetaRewarding.max_judge_share`` of the pairs are judge pairs
     (the first ones of the batch are kept up to floor(s / (1 - s) x actor pairs)), as
     NeMo-Aligner's experimental meta-judge loop bounds judge pairs per batch
     (``meta_judge_pcnt``). One row carries at most one judge pair, so the share is <= 1/2.
  The reported consistency compares M_t's judge scores with M_{t-1}'s (same K, same prompt; at
  t = 1 M0 judging), as for SRLM. M1 is SFT on the seed set plus SRLM's judge-training examples.

From the paper: the three roles of one model; K sampled judgments averaged into the actor's
reward; the meta-judge comparing two judgments of the same response in both orders; battle
counting with weights against positional bias, best and worst judgment as the judge pair; the
response with the most disagreeing judgments as the one meta-judged; DPO on both pair sets.
Reconstructed here ([MEM] in METHODS.md's sense, options or documented choices): the meta-judge's
verdict sampled from the first reply token instead of a sampled chain of thought ending in "Winner:
Judgement A|B" (the paper's prompt); positional weights pooled over the iteration; ranking by
weighted win count instead of an Elo fit of the battle matrix (for K = 2 they coincide); the
same-score filter (NeMo-Aligner's); the per-batch cap on judge pairs (NeMo-Aligner's knob, not the
paper's); our own meta-judge wording. Not included: the paper's length control of the actor
pairs (the score-range rule; ``Run.method = "length_control"`` with ``LengthControl.base =
"meta_rewarding"`` length-controls the actor reward instead) and its judge-pair filters on
judgment length and score distribution.

Shape letters: B prompts, R responses per prompt, K judgments per response, J judge pairs,
P prompt tokens, S judgment tokens, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cream_jax import judge, losses, metrics, scoring
from cream_jax.data import pipeline
from cream_jax.engine.host import batched, decode_responses, encode_texts_left_padded, sample_responses, score_sequences
from cream_jax.methods.base import Method, Rewards, Selection, register

META_JUDGE_TEMPLATE = """Review the user's request, the response to it, and two judgments that rate the response from 0 to 5 points. Decide which judgment is more accurate: which one applies the rating criteria more faithfully and gives the response the more fitting score.

User: {instruction}
<response>{response}</response>
<judgment 1>{judgment_1}</judgment 1>
<judgment 2>{judgment_2}</judgment 2>

Reply with a single digit: 1 if judgment 1 is better, 2 if judgment 2 is better."""

# For small contexts, as judge.COMPACT_JUDGE_TEMPLATE.
COMPACT_META_JUDGE_TEMPLATE = """Which judgment of the response is more accurate?
User: {instruction}
<response>{response}</response>
<judgment 1>{judgment_1}</judgment 1>
<judgment 2>{judgment_2}</judgment 2>
Reply 1 or 2."""

JUDGE_PAIR_DROPS = ("tied", "same_score", "duplicate")


# ------------------------------------------------------------------------------------------------
# The formulas, on plain arrays.


def most_uncertain_response(scores: np.ndarray) -> np.ndarray:
    """[B] index of each prompt's response whose parsed judge scores vary most, -1 where none has
    >= 2 parsed scores with variance > 0.

    Args:
      scores: [B, R, K] parsed scores, NaN where a judgment did not parse.
    """
    ok = np.isfinite(scores)
    n = ok.sum(-1)
    mean = np.where(ok, scores, 0.0).sum(-1) / np.maximum(n, 1)
    var = np.where(ok, (scores - mean[..., None]) ** 2, 0.0).sum(-1) / np.maximum(n, 1)  # [B, R]
    eligible = (n >= 2) & (var > 0)
    return np.where(eligible.any(-1), np.argmax(np.where(eligible, var, -np.inf), axis=-1), -1)


def positional_weights(first_wins: list[np.ndarray]) -> tuple[float, float]:
    """(w_first, w_second): the weight of a win from the first / second position (module docstring).

    Args:
      first_wins: battles, each [m, m] bool: entry [j, k] (j != k) is True when the meta-judge,
        shown j first and k second, preferred j. Diagonals are ignored.
    """
    n_first = sum(int(w[~np.eye(len(w), dtype=bool)].sum()) for w in first_wins)
    n_total = sum(len(w) * (len(w) - 1) for w in first_wins)
    if n_total == 0:
        return 0.5, 0.5
    return (n_total - n_first) / n_total, n_first / n_total


def battle_wins(first_wins: np.ndarray, w_first: float, w_second: float) -> np.ndarray:
    """[m] weighted wins of each judgment: sum_k w_first * win_first[j, k] + w_second * (1 - win_first[k, j])."""
    w = np.asarray(first_wins, np.float64)
    b = w_first * w + w_second * (1.0 - w.T)
    np.fill_diagonal(b, 0.0)
    return b.sum(axis=1)


def judge_pair(wins: np.ndarray, scores: np.ndarray, texts: list[str]) -> tuple[int, int, str | None]:
    """(chosen, rejected, None) = (argmax, argmin) of ``wins``, or (.., .., reason) for a dropped
    pair: "tied" (equal wins), "same_score" (the two give one score), "duplicate" (one text)."""
    chosen, rejected = int(np.argmax(wins)), int(np.argmin(wins))
    if wins[chosen] <= wins[rejected]:
        return chosen, rejected, "tied"
    if scores[chosen] == scores[rejected]:
        return chosen, rejected, "same_score"
    if texts[chosen] == texts[rejected]:
        return chosen, rejected, "duplicate"
    return chosen, rejected, None


def capped_judge_weight(weight, judge_valid, max_share: float):
    """[B] weight of each row's judge pair in one train batch: the first judge pairs of the batch
    up to floor(s / (1 - s) x actor pairs), so judge pairs / all pairs <= s (jnp, jit-safe).

    Args:
      weight: [B] the actor pairs' weights (0: padding row).
      judge_valid: [B] 1 where the row carries a judge pair.
      max_share: s in [0, 1/2].
    """
    real = (jnp.asarray(weight) > 0).astype(jnp.float32)
    present = jnp.asarray(judge_valid, jnp.float32) * real
    cap = jnp.floor(max_share / (1.0 - max_share) * jnp.sum(real) + 1e-6)
    return present * (jnp.cumsum(present) <= cap)


# ------------------------------------------------------------------------------------------------
# Model calls.


def sample_judgments(model, tokenizer, instructions, responses, *, key, tokens, template, num_judgments,
                     max_judgment_tokens, max_prompt_len, batch_size, readout="parsed", progress=None,
                     layers="unroll") -> dict:
    """K sampled judgments of every (instruction, response) (SRLM's judge sampling, T=0.7, top-p 0.9).

    ``readout``: "parsed": a judgment's score is its last "Score: k" (NaN if none, the paper);
    "expected": the probability-weighted score sum_k k p(k) after the judgment, cut before its
    last "Score:" label or with the label appended (never missing; for models that have not
    learned the format, e.g. the smoke configuration's). ``layers``: the decode program
    (``Sampling.layers``).

    Returns:
      {"prompt_ids", "prompt_mask": [N, P] the judge prompts; "tokens", "mask": [N, K, S];
       "texts": N lists of K; "scores": [N, K], NaN where unparsed}.
    """
    prompts = judge.render_judge_prompts(tokenizer, instructions, responses, template)
    enc = encode_texts_left_padded(tokenizer, prompts, max_prompt_len, bucket=64, what="judge prompts")
    toks, tmask = sample_responses(
        model, enc["input_ids"], enc["attention_mask"], key=key, num_samples=num_judgments,
        max_new_tokens=max_judgment_tokens, temperature=0.7, top_p=0.9, top_k=0, tokens=tokens,
        batch_size=batch_size, progress=progress, layers=layers)
    texts = decode_responses(tokenizer, toks, tmask)
    if readout == "parsed":
        scores = np.array([[np.nan if (v := judge.parse_score(t)) is None else v for t in row] for row in texts], np.float32)
    else:
        flat = [t for row in texts for t in row]
        forced, digit_ids, _ = judge.expected_score_prompts(
            tokenizer, [i for i in instructions for _ in range(num_judgments)],
            [r for r in responses for _ in range(num_judgments)], flat, template)
        logits = last_token_logits(model, tokenizer, forced, digit_ids, max_len=enc["input_ids"].shape[1] + max_judgment_tokens + 4,
                                   batch_size=batch_size, what="judge prompts with their judgments")
        scores = np.asarray(judge.expected_score(logits, np.arange(judge.MAX_SCORE + 1)), np.float32)
    return {"prompt_ids": enc["input_ids"], "prompt_mask": enc["attention_mask"], "tokens": toks, "mask": tmask,
            "texts": texts, "scores": scores.reshape(len(texts), num_judgments)}


@functools.cache
def _last_logits_fn(graphdef):
    """One jitted forward per model structure: the logits of some tokens at the last position (the
    LM head on that position only)."""

    @jax.jit
    def last_logits(state, input_ids, attention_mask, token_ids):
        model = nnx.merge(graphdef, state)
        h_btd, _ = model.hidden_states(input_ids, attention_mask)
        return jnp.take(model.logits(h_btd[:, -1]), token_ids, axis=-1)  # (B, n)

    return last_logits


def last_token_logits(model, tokenizer, prompts: list[str], token_ids, *, max_len: int, batch_size: int,
                      what: str) -> np.ndarray:
    """[M, n] logits of ``token_ids`` after each rendered prompt (left-padded to a bucket of 64)."""
    if not prompts:
        return np.zeros((0, len(token_ids)), np.float32)
    enc = encode_texts_left_padded(tokenizer, prompts, max_len, bucket=64, what=what)
    graphdef, state = nnx.split(model)
    fn, ids = _last_logits_fn(graphdef), jnp.asarray(token_ids)
    return np.asarray(batched(model, lambda i, m: fn(state, i, m, ids), [enc["input_ids"], enc["attention_mask"]],
                              batch_size))


# ------------------------------------------------------------------------------------------------
# The method.


@register
class MetaRewarding(Method):
    name = "meta_rewarding"

    def validate(self):
        if self.cfg.dpo.loss_type != "sigmoid":
            raise ValueError(f"config: method='meta_rewarding' trains with its own DPO (sigmoid) terms; DPO.loss_type="
                             f"{self.cfg.dpo.loss_type!r} would be ignored: leave it 'sigmoid'")

    def sft_examples(self, eft):
        if not self.cfg.meta_rewarding.eft:
            return []
        template = self.cfg.meta_rewarding.judge_template
        return [judge.judge_messages(e["instruction"], e["response"], template)
                + [{"role": "assistant", "content": e["justification"]}] for e in eft]

    def learns_to_judge(self):
        return self.cfg.meta_rewarding.eft

    def models_to_score(self, t):
        return frozenset({t})

    def _judgments(self, ctx, rollout, k: int, key) -> dict:
        c, mr = self.cfg, self.cfg.meta_rewarding
        b, r = rollout.shape
        return sample_judgments(
            ctx.model(k), ctx.tokenizer, [rollout.instructions[i] for i in range(b) for _ in range(r)],
            [rollout.texts[i][j] for i in range(b) for j in range(r)], key=key, tokens=ctx.tokens,
            template=mr.judge_template, num_judgments=mr.judge_samples, max_judgment_tokens=mr.max_judgment_tokens,
            max_prompt_len=4 * c.data.max_prompt_len + 256, batch_size=c.sampling.batch_size, readout=mr.score_readout,
            progress=lambda it: metrics.progress(it, desc=f"iter {ctx.t}: judge (M{k})"), layers=c.sampling.layers)

    def rewards(self, ctx, rollout, logps):
        b, r = rollout.shape
        k = self.cfg.meta_rewarding.judge_samples
        now = self._judgments(ctx, rollout, ctx.t, ctx.key)
        prev = self._judgments(ctx, rollout, ctx.t - 1, jax.random.fold_in(ctx.key, 1))
        current, failures = judge.aggregate_sampled_scores(now["scores"].reshape(b, r, k))
        previous, _ = judge.aggregate_sampled_scores(prev["scores"].reshape(b, r, k))
        rows, stats = self._judge_pairs(ctx, rollout, now)
        self._pending = (ctx.t, rollout, rows)  # extra_records (same iteration, after select) attaches them
        return Rewards(current=np.asarray(current, np.float32), previous=np.asarray(previous, np.float32),
                       judge_parse_failures=int(failures), stats=stats)

    def _judge_pairs(self, ctx, rollout, now) -> tuple[dict, dict]:
        """Judge-pair records [J, ...] (judge prompt + chosen / rejected judgment, M_t's reference
        log-probs) and their statistics."""
        c, mr = self.cfg, self.cfg.meta_rewarding
        b, r = rollout.shape
        k = mr.judge_samples
        scores = now["scores"].reshape(b, r, k)
        pick = most_uncertain_response(scores)
        template = COMPACT_META_JUDGE_TEMPLATE if mr.judge_template == "compact" else META_JUDGE_TEMPLATE
        battles, prompts = [], []  # (row of the judged response, its parsed judgments)
        for i in np.nonzero(pick >= 0)[0]:
            row = int(i) * r + int(pick[i])
            parsed = [j for j in range(k) if np.isfinite(now["scores"][row, j])]
            battles.append((row, parsed))
            for j in parsed:
                for jj in parsed:
                    if j != jj:
                        content = template.format(instruction=rollout.instructions[i], response=rollout.texts[i][pick[i]],
                                                  judgment_1=now["texts"][row][j], judgment_2=now["texts"][row][jj])
                        prompts.append(ctx.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                                         add_generation_prompt=True, tokenize=False))
        max_len = 4 * c.data.max_prompt_len + 256 + c.sampling.max_new_tokens + 2 * mr.max_judgment_tokens
        logits = last_token_logits(ctx.model(ctx.t), ctx.tokenizer, prompts, judge.verdict_token_ids(ctx.tokenizer),
                                   max_len=max_len, batch_size=c.sampling.batch_size, what="meta-judge prompts")
        # The verdict is sampled, as the paper samples its meta-judgments: "1" with p("1") / (p("1") + p("2")).
        p_first = jax.nn.sigmoid(jnp.asarray(logits[:, 0] - logits[:, 1], jnp.float32))
        verdicts = iter(np.asarray(jax.random.bernoulli(jax.random.fold_in(ctx.key, 2), p_first)))
        first_wins = []
        for _, parsed in battles:
            m = np.zeros((len(parsed), len(parsed)), bool)
            for a in range(len(parsed)):
                for bb in range(len(parsed)):
                    if a != bb:
                        m[a, bb] = next(verdicts)
            first_wins.append(m)
        w_first, w_second = positional_weights(first_wins)
        drops = dict.fromkeys(JUDGE_PAIR_DROPS, 0)
        chosen_rows = []  # (row, chosen judgment, rejected judgment)
        for (row, parsed), m in zip(battles, first_wins):
            wins = battle_wins(m, w_first, w_second)
            ch, rj, reason = judge_pair(wins, now["scores"][row, parsed], [now["texts"][row][j] for j in parsed])
            if reason is None:
                chosen_rows.append((row, parsed[ch], parsed[rj]))
            else:
                drops[reason] += 1
        n_verdicts = sum(len(m) * (len(m) - 1) for m in first_wins)
        stats = {"judge_pairs": len(chosen_rows), "judge_responses_meta_judged": len(battles),
                 "judge_responses_without_disagreement": int((pick < 0).sum()),
                 **{f"judge_pairs_dropped_{k_}": v for k_, v in drops.items()},
                 "meta_judge_first_position_rate": (w_second if n_verdicts else None)}
        return self._judge_records(ctx, now, chosen_rows), stats

    def _judge_records(self, ctx, now, chosen_rows) -> dict:
        if not chosen_rows:
            return {}
        rows = np.array([row for row, _, _ in chosen_rows])
        pick = np.array([[ch, rj] for _, ch, rj in chosen_rows])  # [J, 2]
        resp = np.take_along_axis(now["tokens"][rows], pick[:, :, None], axis=1)  # [J, 2, S]
        resp_mask = np.take_along_axis(now["mask"][rows], pick[:, :, None], axis=1)
        seqs = pipeline.join_prompt_response(now["prompt_ids"][rows], now["prompt_mask"][rows], resp, resp_mask)
        seqs = {k: np.asarray(v) for k, v in seqs.items()}  # rows [j chosen, j rejected, ...]
        ref, _ = score_sequences(ctx.model(ctx.t), seqs, self.cfg.reward.score_batch_size)
        ref = np.asarray(ref, np.float32).reshape(-1, 2)
        out = {}
        for side, col in (("chosen", 0), ("rejected", 1)):
            out[f"judge_{side}_ids"] = seqs["input_ids"][col::2]
            out[f"judge_{side}_mask"] = seqs["attention_mask"][col::2]
            out[f"judge_{side}_resp"] = seqs["response_mask"][col::2]
            out[f"judge_ref_{side}"] = ref[:, col]
        return out

    def select(self, ctx, rollout, rewards, pairs, consistency):
        n_kept = int(np.asarray(pairs.keep).sum())
        n_judge = rewards.stats.get("judge_pairs", 0)
        return Selection(pairs, np.ones(np.shape(pairs.keep), np.float32),
                         stats={"judge_pairs_attached": min(n_judge, n_kept),
                                "judge_pairs_dropped_no_actor_pair": max(0, n_judge - n_kept)})

    def extra_records(self, ctx, rollout, pairs):
        """The judge pairs, one per kept actor pair's row at most (``judge_valid`` marks them)."""
        t, pending_rollout, rows = getattr(self, "_pending", (None, None, None))
        if t != ctx.t or pending_rollout is not rollout:
            raise RuntimeError("meta_rewarding: extra_records must follow rewards() of the same iteration and rollout")
        n = int(np.asarray(pairs.keep).sum())
        n_judge = len(next(iter(rows.values()))) if rows else 0
        slots = min(n, n_judge)
        out = {"judge_valid": (np.arange(n) < slots).astype(np.float32)}
        if not rows:  # no judge pair this iteration: one-token placeholders at weight 0
            rows = {f"judge_{s}_{f}": np.zeros((1, 1), np.int32) for s in ("chosen", "rejected") for f in ("ids", "mask", "resp")}
            rows |= {"judge_ref_chosen": np.zeros((1,), np.float32), "judge_ref_rejected": np.zeros((1,), np.float32)}
        for name, v in rows.items():  # rows beyond the judge pairs repeat pair 0 at weight 0
            idx = np.where(np.arange(n) < slots, np.arange(n), 0)
            out[name] = v[idx]
        return out

    def loss_fn(self, tokenizer):
        return make_meta_rewarding_loss(self.cfg.dpo.beta, self.cfg.meta_rewarding.max_judge_share)


def make_meta_rewarding_loss(beta: float, max_judge_share: float):
    """DPO over a batch's actor pairs and its (capped) judge pairs, one mean over all of them."""

    def pair_logps(model, batch, prefix):
        ids = jnp.concatenate([batch[f"{prefix}chosen_ids"], batch[f"{prefix}rejected_ids"]], axis=0)  # (2B, T)
        mask = jnp.concatenate([batch[f"{prefix}chosen_mask"], batch[f"{prefix}rejected_mask"]], axis=0)
        resp = jnp.concatenate([batch[f"{prefix}chosen_resp"], batch[f"{prefix}rejected_resp"]], axis=0)
        sum_logp, _ = scoring.model_response_logprobs(model, ids, mask, resp)  # (2B,)
        b = batch[f"{prefix}chosen_ids"].shape[0]
        return sum_logp[:b], sum_logp[b:]

    def loss_fn(graphdef, params, batch):
        model = nnx.merge(graphdef, params)
        chosen, rejected = pair_logps(model, batch, "")
        actor = losses.dpo_loss(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], beta=beta)  # (B,)
        j_chosen, j_rejected = pair_logps(model, batch, "judge_")
        judged = losses.dpo_loss(j_chosen, j_rejected, batch["judge_ref_chosen"], batch["judge_ref_rejected"], beta=beta)
        w = batch["weight"]
        jw = capped_judge_weight(w, batch["judge_valid"], max_judge_share)
        total = jnp.maximum(jnp.sum(w) + jnp.sum(jw), 1.0)
        loss = (jnp.sum(actor * w) + jnp.sum(judged * jw)) / total
        margin = beta * ((chosen - batch["ref_chosen"]) - (rejected - batch["ref_rejected"]))
        return loss, {
            "loss": loss,
            "actor_loss": jnp.sum(actor * w) / jnp.maximum(jnp.sum(w), 1.0),
            "judge_loss": jnp.sum(judged * jw) / jnp.maximum(jnp.sum(jw), 1.0),
            "judge_share": jnp.sum(jw) / total,
            "rewards/margins": jnp.sum(margin * w) / jnp.maximum(jnp.sum(w), 1.0),
        }

    return loss_fn
