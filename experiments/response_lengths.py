"""Response lengths in tokens per iteration, from the samples a run logs (``samples/iter_<t>.jsonl``).

    python experiments/response_lengths.py --root runs/smollm2_stage_a

The trainer logs only a few prompts per iteration (their N sampled responses, with the chosen and
rejected index) and a few greedy eval answers, not the whole rollout: the means printed here are
over those logged texts (the count is printed beside each), an indication of length drift, not a
measurement over the pool. Row t follows the results rows: the responses M_t sampled in iteration t
and the eval answers of the model trained in it (t = -1: M0's eval answers, t = 0: M1's). Tokens are
counted, without special tokens, by the tokenizer of the run's own ``Model.source`` (a GGUF file or
``pkg:`` spec, read from its results.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cream_jax.models import gguf

KINDS = ("sampled", "chosen", "rejected", "eval")


def lengths(tokenizer, texts: list[str]) -> list[int]:
    return [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


def run_lengths(tokenizer, workdir: Path) -> dict[int, dict[str, list[int]]]:
    """iteration -> {"sampled", "chosen", "rejected", "eval"} -> token counts of that file's texts."""
    out: dict[int, dict[str, list[int]]] = {}
    for path in sorted((workdir / "samples").glob("iter_*.jsonl")):
        t = int(path.stem.split("_", 1)[1])
        kinds: dict[str, list[str]] = {k: [] for k in KINDS}
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "eval" in row:
                kinds["eval"].append(row["eval"]["answer"])
                continue
            kinds["sampled"] += row["responses"]
            if row.get("kept") and row.get("chosen") is not None:
                kinds["chosen"].append(row["responses"][row["chosen"]])
                kinds["rejected"].append(row["responses"][row["rejected"]])
        out[t] = {k: lengths(tokenizer, v) for k, v in kinds.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="a paper_table.py --root (seed*/<method>/samples)")
    args = parser.parse_args(argv)
    tokenizers: dict[str, object] = {}  # one per Model.source: a GGUF's tokenizer takes seconds to build
    table: dict[tuple[str, int], dict[str, list[int]]] = {}
    for workdir in sorted(Path(args.root).glob("seed*/*")):
        if not (workdir / "samples").is_dir() or not (workdir / "results.json").exists():
            continue
        source = json.loads((workdir / "results.json").read_text())["config"]["model"]["source"]
        if source not in tokenizers:
            tokenizers[source] = gguf.load_gguf_tokenizer(gguf.resolve_model_source(source))
        for t, kinds in run_lengths(tokenizers[source], workdir).items():
            acc = table.setdefault((workdir.name, t), {})
            for k, v in kinds.items():
                acc.setdefault(k, []).extend(v)
    print("method  iteration  " + "  ".join(f"{k} tokens (n)" for k in KINDS))
    for (method, t), kinds in sorted(table.items()):
        cells = [f"{np.mean(v):7.1f} ({len(v)})" if v else "      - (0)" for v in (kinds.get(k, []) for k in KINDS)]
        print(f"{method}  {t:>3}  " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
