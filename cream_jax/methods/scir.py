"""SCIR (METHODS.md section 5, a [MEM] reconstruction from the abstract): two internal reward
models of M_t, the implicit DPO reward and a pairwise generative judge (the same model asked
which response is better, both orders), are pushed to agree by a divergence penalty inside every
step, and DPO trains only on the pairs they agree on (``losses.scir_loss``).

The generative judge is trained to judge at stage M1: the seed SFT set gets pairwise EFT
examples (``pairwise_eft_chats``). At the first step the policy equals its reference, so the
implicit preference is an exact tie in theory; the log-probs of the reference (scoring program)
and of the policy (train step) come from two programs whose float rounding differs, so a tie is
|Delta| <= ``SCIR.tie_tolerance`` rather than Delta == 0.
"""

from __future__ import annotations

import numpy as np

from cream_jax import judge
from cream_jax.engine.host import encode_texts_left_padded
from cream_jax.methods.base import Method, register


def pairwise_eft_chats(eft) -> list[list[dict]]:
    """Pairwise judge-training chats (EFT-style, METHODS 3.1 applied to the pairwise template).

    Each EFT example whose oracle score beats an off-topic answer (> 1 point) is paired with the
    worked solution of another question of its task, which is exactly the suite's "off_topic" kind
    (1 point by its rubric); both presentation orders, the verdict is the better one's position.
    Examples from a file (``Data.eft_path``) may carry no task (one group) and no kind (the
    solutions are then those scored 5).
    """
    by_task: dict[str | None, list[dict]] = {}
    for e in eft:
        by_task.setdefault(e.get("task"), []).append(e)
    chats = []
    for items in by_task.values():
        solutions = [e for e in items if e.get("kind", "correct" if e["score"] == judge.MAX_SCORE else None) == "correct"]
        for e in items:
            others = [s for s in solutions if s["instruction"] != e["instruction"]]
            if e["score"] <= 1 or not others:
                continue
            foreign = others[len(chats) % len(others)]["response"]
            for first, second, verdict in ((e["response"], foreign, "1"), (foreign, e["response"], "2")):
                chats.append(judge.pairwise_judge_messages(e["instruction"], first, second)
                             + [{"role": "assistant", "content": verdict}])
    return chats


@register
class SCIR(Method):
    name = "scir"

    def validate(self):
        if self.cfg.dpo.loss_type != "sigmoid":
            raise ValueError(f"config: method='scir' trains with its own DPO (sigmoid) term; DPO.loss_type="
                             f"{self.cfg.dpo.loss_type!r} would be ignored: leave it 'sigmoid'")

    def sft_examples(self, eft):
        return pairwise_eft_chats(eft) if self.cfg.scir.eft_pairs else []

    def learns_to_judge(self):
        return self.cfg.scir.eft_pairs

    def extra_records(self, ctx, rollout, pairs):
        """Pairwise judge prompts of every kept pair in both orders (the generative reward's input)."""
        idx = np.nonzero(np.asarray(pairs.keep))[0]
        chosen, rejected = np.asarray(pairs.chosen_idx), np.asarray(pairs.rejected_idx)
        max_len = 4 * self.cfg.data.max_prompt_len + 2 * self.cfg.sampling.max_new_tokens
        out = {}
        for name, first, second in (("judge12", chosen, rejected), ("judge21", rejected, chosen)):
            msgs = [(rollout.instructions[i], rollout.texts[i][int(first[i])], rollout.texts[i][int(second[i])]) for i in idx]
            rendered = judge.render_pairwise_prompts(ctx.tokenizer, *zip(*msgs)) if msgs else []
            # Padded to the longest prompt (a multiple of 64), not to max_len: each train step runs the judge
            # on both orders with gradients, and at SmolLM2's 768-token max_len that was 3x the DPO pair's tokens.
            enc = encode_texts_left_padded(ctx.tokenizer, rendered, max_len, bucket=64,
                                           what=f"SCIR pairwise judge prompts ({name})")
            out[f"{name}_ids"], out[f"{name}_mask"] = enc["input_ids"], enc["attention_mask"]
        return out

    def loss_fn(self, tokenizer):
        from cream_jax import steps  # noqa: PLC0415 — model code, only when training

        c = self.cfg.scir
        return steps.make_scir_loss(self.cfg.dpo.beta, c.alpha, c.gamma, c.divergence,
                                    judge.verdict_token_ids(tokenizer), tie_tolerance=c.tie_tolerance)
