"""SRLM (METHODS.md section 3): M_t judges its own responses with the LLM-as-a-Judge prompt
(additive 5-point score), best vs worst with ties dropped, plain DPO with reference M_t. M1 is
SFT on the seed set plus the judge-training (EFT) examples.

The reported consistency compares the same ranker across iterations: M_t's judge scores against
M_{t-1}'s (at t = 1, M0 judging); ``SRLM.report_consistency = False`` skips M_{t-1}'s judging, which
ranks nothing. Only M_t scores the rollout's log-probs (the DPO reference).
"""

from __future__ import annotations

import jax
import numpy as np

from cream_jax import judge, metrics
from cream_jax.engine import judging
from cream_jax.methods.base import Method, Rewards, register

@register
class SRLM(Method):
    name = "srlm"

    def sft_examples(self, eft):
        template = self.cfg.srlm.judge_template
        return [judge.judge_messages(e["instruction"], e["response"], template)
                + [{"role": "assistant", "content": e["justification"]}] for e in eft]

    def learns_to_judge(self):
        return True

    def models_to_score(self, t):
        return frozenset({t})

    def judge(self, ctx, rollout, k: int, key) -> tuple[np.ndarray, int]:
        """[B, R] scores of M_k judging the rollout (NaN where unparsed), and the failure count."""
        c = self.cfg
        return judging.judge_scores(
            ctx.model(k), ctx.tokenizer, rollout.instructions, rollout.texts, readout=c.srlm.judge_readout, key=key,
            tokens=ctx.tokens, max_prompt_len=4 * c.data.max_prompt_len + 256, max_judgment_tokens=c.srlm.max_judgment_tokens,
            num_judgments=c.srlm.judge_samples, batch_size=c.sampling.batch_size, template=c.srlm.judge_template,
            progress=lambda it: metrics.progress(it, desc=f"iter {ctx.t}: judge (M{k})"), layers=c.sampling.layers,
        )

    def rewards(self, ctx, rollout, logps):
        now, failures = self.judge(ctx, rollout, ctx.t, ctx.key)
        if not self.cfg.srlm.report_consistency:
            return Rewards(current=now, previous=None, judge_parse_failures=failures)
        prev, _ = self.judge(ctx, rollout, ctx.t - 1, jax.random.fold_in(ctx.key, 1))
        return Rewards(current=now, previous=prev, judge_parse_failures=failures)
