"""The embedded tokenizer: loads with AutoTokenizer, round-trips text, Llama-3 chat template,
and the committed folder is regenerated bit for bit."""

import filecmp
import os

import pytest
from transformers import AutoTokenizer

from cream_jax.data.tokenizer import (
    BOS,
    EMBEDDED_TOKENIZER_DIR,
    END_HEADER,
    EOT,
    PAD,
    START_HEADER,
    VOCAB_SIZE,
    load_embedded_tokenizer,
    main,
)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(EMBEDDED_TOKENIZER_DIR))


def test_special_tokens(tok):
    assert len(tok) == VOCAB_SIZE
    assert tok.bos_token == BOS and tok.eos_token == EOT and tok.pad_token == PAD
    assert tok.pad_token_id != tok.eos_token_id
    ids = {tok.convert_tokens_to_ids(t) for t in (BOS, START_HEADER, END_HEADER, EOT, PAD)}
    assert len(ids) == 5 and all(i < VOCAB_SIZE for i in ids)
    # Special tokens are atomic even inside text.
    assert tok(f"a{EOT}b", add_special_tokens=False)["input_ids"][1] == tok.eos_token_id


@pytest.mark.parametrize(
    "text",
    ["Ann has 3 apples. She gets 4 more.", "  leading and trailing  ", "héllo wörld — ∑ 😀", "line\n\nbreaks\t\ttabs",
     "x" * 50, ""],
)
def test_round_trip(tok, text):
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id  # bos prepended, as in Llama-3
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_digits_are_single_tokens(tok):
    pieces = tok.convert_ids_to_tokens(tok("12345", add_special_tokens=False)["input_ids"])
    assert pieces == ["1", "2", "3", "4", "5"]
    # Frequent words of the suite are single tokens (merges were learned).
    assert len(tok(" answer", add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_renders_llama3_format(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Who wears blue? "},
        {"role": "assistant", "content": "Bob wears blue."},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        f"{BOS}{START_HEADER}system{END_HEADER}\n\nBe brief.{EOT}"
        f"{START_HEADER}user{END_HEADER}\n\nWho wears blue?{EOT}"  # content is trimmed
        f"{START_HEADER}assistant{END_HEADER}\n\nBob wears blue.{EOT}"
    )
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == text[: text.rindex("Bob")]
    # The rendered prompt tokenizes as a prefix of the rendered conversation (no merge across
    # the header's "\n\n"), so sampling and scoring see the same prompt tokens.
    full = tok(text, add_special_tokens=False)["input_ids"]
    head = tok(prompt, add_special_tokens=False)["input_ids"]
    assert full[: len(head)] == head
    assert full[-1] == tok.eos_token_id


def test_load_embedded_tokenizer_and_bad_path(tmp_path):
    assert load_embedded_tokenizer().eos_token == EOT
    with pytest.raises(ValueError, match="has no tokenizer_config.json"):
        load_embedded_tokenizer(tmp_path)


def test_regenerate_is_bit_identical(tmp_path):
    main(["--out", str(tmp_path)])
    committed = sorted(os.listdir(EMBEDDED_TOKENIZER_DIR))
    assert sorted(os.listdir(tmp_path)) == committed
    match, mismatch, errors = filecmp.cmpfiles(EMBEDDED_TOKENIZER_DIR, tmp_path, committed, shallow=False)
    assert mismatch == [] and errors == [] and match == committed
