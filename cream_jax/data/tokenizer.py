"""The embedded tokenizer: a small byte-level BPE trained on the default suite, saved as a normal
Hugging Face tokenizer folder so ``transformers.AutoTokenizer.from_pretrained`` loads it and the
same code path serves a real LLaMA tokenizer.

Design (Llama-3 style): byte-level BPE (any text encodes), the Llama-3 pre-tokenizer regex with
numbers split into single digits, special tokens ``<|begin_of_text|>`` (bos, prepended by the
post-processor), ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>`` (eos: ends every
turn) and ``<|pad|>`` (pad, distinct from eos), and the Llama-3 chat template (system / user /
assistant, ``add_generation_prompt``). Training is deterministic; the committed folder
``cream_jax/assets/tiny_tokenizer`` is regenerated bit for bit by::

    python -m cream_jax.data.tokenizer --out DIR
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from cream_jax.data.synthetic import Suite, SuiteConfig, make_suite

EMBEDDED_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"
VOCAB_SIZE = 512
BOS, START_HEADER, END_HEADER, EOT, PAD = (
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>",
)
SPECIAL_TOKENS = (BOS, START_HEADER, END_HEADER, EOT, PAD)
# Llama-3's pre-tokenizer regex with ``\p{N}{1,3}`` replaced by ``\p{N}`` (one digit per token).
# ``\s*[\r\n]+`` keeps the "\n\n" after a header in one piece, so a rendered prompt tokenizes as a
# prefix of the rendered conversation (the trimmed content never starts with whitespace).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The Llama-3 (Instruct) chat template.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def training_texts(suite: Suite) -> Iterator[str]:
    """Texts the BPE is trained on: corpus, SFT and EFT text of the suite (never test questions).

    Chats are fed as "role\\n\\ncontent" pieces: the special tokens around them never take part in
    merges, so the rendered template is not needed here.
    """
    for item in suite.pretrain:
        if "text" in item:
            yield item["text"]
        else:
            yield from (f"{m['role']}\n\n{m['content']}" for m in item["messages"])
    for item in suite.sft:
        yield from (f"{m['role']}\n\n{m['content']}" for m in item["messages"])
    for item in suite.eft:
        yield from (item["instruction"], item["response"], item["justification"])


def build_tokenizer(suite_config: SuiteConfig = SuiteConfig(), vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Trains the byte-level BPE on ``make_suite(suite_config)`` and wraps it for transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_texts(make_suite(suite_config)), trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Llama-3: plain ``tokenizer(text)`` prepends bos; chat templates write it themselves.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def save_tokenizer(out_dir: str | Path, suite_config: SuiteConfig = SuiteConfig(), vocab_size: int = VOCAB_SIZE) -> Path:
    """Builds the tokenizer and writes the HF folder (tokenizer.json, tokenizer_config.json with
    the chat template inline) to ``out_dir``."""
    out_dir = Path(out_dir)
    build_tokenizer(suite_config, vocab_size).save_pretrained(str(out_dir), save_jinja_files=False)
    return out_dir


def load_embedded_tokenizer(path: str | Path | None = None):
    """``AutoTokenizer.from_pretrained`` of ``path`` (default: the committed embedded tokenizer)."""
    path = Path(path) if path is not None else EMBEDDED_TOKENIZER_DIR
    if not (path / "tokenizer_config.json").is_file():
        raise ValueError(f"load_embedded_tokenizer: {path} has no tokenizer_config.json")
    return AutoTokenizer.from_pretrained(str(path))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(EMBEDDED_TOKENIZER_DIR), help="output folder")
    args = parser.parse_args(argv)
    print(f"wrote {save_tokenizer(args.out)}")


if __name__ == "__main__":
    main()
