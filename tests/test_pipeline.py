"""Tokenization, masks, padding, the prompt/response layout and the resumable grain loader."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

from cream_jax.data.pipeline import (
    assistant_header_len,
    bucket_length,
    encode_corpus,
    encode_pairs,
    encode_prompts,
    encode_responses,
    encode_sft,
    join_prompt_response,
    make_loader,
)
from cream_jax.data.tokenizer import EMBEDDED_TOKENIZER_DIR

# The embedded Llama-3 template with {% generation %} marks around each assistant content + eot:
# transformers' own return_assistant_tokens_mask is the reference for the SFT loss mask.
GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"


def chat(q, a=None, system=None):
    out = [{"role": "system", "content": system}] if system else []
    out.append({"role": "user", "content": q})
    return out + ([{"role": "assistant", "content": a}] if a is not None else [])


CHATS = [
    chat("Ann has 3 apples. She gets 4 more. How many apples does Ann have now?", "3 + 4 = 7. The answer is 7."),
    chat("Context: Bob wears blue. Question: Who wears blue? (A) Bob (B) Cid", "Bob wears blue. The answer is (A).", "Be brief."),
    chat("Hi", "Hello 😀") + chat("Again, 12?", "Yes: 12."),
]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(EMBEDDED_TOKENIZER_DIR))


def _real(row, mask):
    return [int(t) for t, m in zip(row, mask) if m]


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 32, 33, 64, 65, 97)] == [32, 32, 64, 64, 96, 128]
    assert bucket_length(5, buckets=(8, 4)) == 8
    with pytest.raises(ValueError, match="length 9000 exceeds the largest bucket 8192"):
        bucket_length(9000)


def test_encode_sft_mask_matches_transformers_assistant_mask(tok):
    out = encode_sft(tok, CHATS)
    assert out["input_ids"].shape == (3, 64) and all(v.dtype == np.int32 for v in out.values())
    for i, messages in enumerate(CHATS):
        ref = tok.apply_chat_template(messages, chat_template=GENERATION_TEMPLATE, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        n = len(ref["input_ids"])
        assert out["input_ids"][i, :n].tolist() == list(ref["input_ids"])
        assert out["loss_mask"][i, :n].tolist() == list(ref["assistant_masks"])
        assert out["attention_mask"][i].tolist() == [1] * n + [0] * (64 - n)  # right-padded
        assert (out["input_ids"][i, n:] == tok.pad_token_id).all() and not out["loss_mask"][i, n:].any()
    # The scored tokens decode to exactly the response(s) plus the end-of-turn token.
    scored = tok.decode(_real(out["input_ids"][0], out["loss_mask"][0]))
    assert scored == "3 + 4 = 7. The answer is 7.<|eot_id|>"


def test_encode_sft_include_header(tok):
    out = encode_sft(tok, CHATS[:2], max_len=96, include_header=True)
    assert out["input_ids"].shape == (2, 96)
    assert tok.decode(_real(out["input_ids"][1], out["loss_mask"][1])) == HEADER + "Bob wears blue. The answer is (A).<|eot_id|>"
    assert out["loss_mask"][1].sum() == encode_sft(tok, CHATS[1:2])["loss_mask"].sum() + assistant_header_len(tok)


def test_encode_sft_overflow(tok):
    with pytest.raises(ValueError, match="encode_sft: example 'x0' has 45 tokens > max_len=10"):
        encode_sft(tok, CHATS[:1] * 2, max_len=10, ids=["x0", "x1"])
    out = encode_sft(tok, CHATS[:1], max_len=10, on_overflow="truncate")
    assert out["attention_mask"].sum() == 10
    with pytest.raises(ValueError, match="has no assistant turn"):
        encode_sft(tok, [chat("q")])
    with pytest.raises(ValueError, match="encode_sft: no examples"):
        encode_sft(tok, [])
    with pytest.raises(ValueError, match="on_overflow must be one of"):
        encode_prompts(tok, [chat("q")], 8, "drop")


def test_encode_prompts_left_pads_and_truncates(tok):
    prompts = [chat("Ann has 3 apples. How many?"), chat("Hi", system="Be brief.")]
    ids, mask, n_trunc = encode_prompts(tok, prompts, 32)
    assert ids.shape == mask.shape == (2, 32) and ids.dtype == np.int32 and n_trunc == 0
    for i, p in enumerate(prompts):
        ref = list(tok.apply_chat_template(p, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
        assert mask[i].tolist() == [0] * (32 - len(ref)) + [1] * len(ref)  # left-padded
        assert ids[i, 32 - len(ref):].tolist() == ref and (ids[i, : 32 - len(ref)] == tok.pad_token_id).all()
    ids2, mask2, n_trunc = encode_prompts(tok, prompts, 8)
    assert n_trunc == 2 and mask2.all()
    ref = list(tok.apply_chat_template(prompts[0], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
    assert ids2[0].tolist() == ref[-8:]  # the end (with the generation header) is kept
    short = len(tok.apply_chat_template(chat("Hi"), tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
    match = f"encode_prompts: example 'p1' has {len(ref)} tokens > max_prompt_len={short}"
    with pytest.raises(ValueError, match=match):
        encode_prompts(tok, [chat("Hi"), prompts[0]], short, "error", ids=["p0", "p1"])
    assert encode_prompts(tok, prompts)[0].shape == (2, 32)  # bucketed


def test_join_prompt_response_layout_numpy_and_jax():
    B, R, Tp, Tr = 2, 3, 4, 3
    prompt_ids = np.array([[0, 0, 11, 12], [0, 21, 22, 23]], np.int32)
    prompt_mask = (prompt_ids > 0).astype(np.int32)
    response_ids = np.arange(B * R * Tr, dtype=np.int32).reshape(B, R, Tr) + 100
    response_mask = np.array([[[1, 1, 0], [1, 1, 1], [1, 0, 0]], [[1, 0, 0], [0, 0, 0], [1, 1, 1]]], np.int32)
    out = join_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask)
    assert out["input_ids"].shape == (B * R, Tp + Tr)
    for b in range(B):
        for r in range(R):
            row = b * R + r
            assert out["input_ids"][row].tolist() == prompt_ids[b].tolist() + response_ids[b, r].tolist()
            assert out["attention_mask"][row].tolist() == prompt_mask[b].tolist() + response_mask[b, r].tolist()
            assert out["response_mask"][row].tolist() == [0] * Tp + response_mask[b, r].tolist()
    head = join_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask, header_len=2)
    assert head["response_mask"][3].tolist() == [0, 0, 1, 1] + response_mask[1, 0].tolist()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def jitted(*args):
        return join_prompt_response(*args)

    for _ in range(3):
        got = jitted(*map(jnp.asarray, (prompt_ids, prompt_mask, response_ids, response_mask)))
    for k in out:
        assert isinstance(got[k], jax.Array) and got[k].dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got[k]), out[k])
    with pytest.raises(ValueError, match="do not match"):
        join_prompt_response(prompt_ids, prompt_mask, response_ids[:1], response_mask[:1])


def test_encode_responses_and_pairs_match_the_rendered_conversation(tok):
    prompts = [chat("Ann has 3 apples. How many?"), chat("Who wears blue? (A) Bob (B) Cid", system="Be brief.")]
    chosen, rejected = ["The answer is 3.", "Bob wears blue. The answer is (A)."], ["I am not sure 😀", "(B)"]
    out = encode_pairs(tok, prompts, chosen, rejected, max_prompt_len=64, max_response_len=16, ids=["a", "b"])
    assert out["input_ids"].shape == (4, 80)
    for b in range(2):
        for r, text in enumerate((chosen[b], rejected[b])):
            row = 2 * b + r
            full = tok.apply_chat_template(prompts[b] + [{"role": "assistant", "content": text}], tokenize=True,
                                           return_dict=True)["input_ids"]
            assert _real(out["input_ids"][row], out["attention_mask"][row]) == list(full)
            assert tok.decode(_real(out["input_ids"][row], out["response_mask"][row])) == text + "<|eot_id|>"
    head = encode_pairs(tok, prompts, chosen, rejected, 64, 16, include_header=True)
    assert tok.decode(_real(head["input_ids"][0], head["response_mask"][0])) == HEADER + chosen[0] + "<|eot_id|>"
    with pytest.raises(ValueError, match=r"encode_responses: example 'b' response 1 has \d\d tokens > max_response_len=8"):
        encode_pairs(tok, prompts, ["ok", "ok"], ["no", "The answer is " * 5], 64, 8, ids=["a", "b"])
    ids, mask = encode_responses(tok, prompts, [["x", "y", "z"], ["u", "v", "w"]])
    assert ids.shape == mask.shape == (2, 3, 32) and mask.sum(-1).tolist() == [[2, 2, 2], [2, 2, 2]]
    assert assistant_header_len(tok) == 4


def test_encode_corpus_packs_documents(tok):
    items = [{"text": "Ann has 3 apples."}, {"messages": CHATS[0]}, {"text": "x"}]
    out = encode_corpus(tok, items, seq_len=16)
    stream = (tok("Ann has 3 apples.")["input_ids"] + [tok.eos_token_id]
              + list(tok.apply_chat_template(CHATS[0], tokenize=True, return_dict=True)["input_ids"])
              + tok("x")["input_ids"] + [tok.eos_token_id])
    assert out["input_ids"].shape == (-(-len(stream) // 16), 16)
    assert _real(out["input_ids"].ravel(), out["attention_mask"].ravel()) == stream
    assert (out["loss_mask"] == out["attention_mask"]).all() and out["attention_mask"][-1, -1] == 0
    with pytest.raises(ValueError, match="item 0 has neither 'text' nor 'messages'"):
        encode_corpus(tok, [{"prompt": "x"}], 8)


def test_loader_resumes_at_the_same_batch():
    records = [{"x": np.array([i, i * 10], np.int32), "id": i} for i in range(23)]

    def loader():
        return make_loader(records, 4, seed=3, num_epochs=2, transform=lambda r: {**r, "y": r["x"] + 1})

    it = loader()
    for _ in range(4):
        next(it)
    state = it.get_state()
    rest = [b for b in it]
    resumed = loader()
    resumed.set_state(state)
    again = [b for b in resumed]
    assert len(rest) == len(again) == 46 // 4 - 4
    for a, b in zip(rest, again):
        chex.assert_trees_all_equal(a, b)
    batch = rest[0]
    assert batch["x"].shape == (4, 2) and (batch["y"] == batch["x"] + 1).all()
    # Each epoch is a permutation, and the two epochs are shuffled differently.
    first = [b["id"].tolist() for b in make_loader(records, 23, seed=3, num_epochs=2)]
    assert sorted(first[0]) == sorted(first[1]) == list(range(23)) and first[0] != first[1]


def test_loader_over_arrays_and_options():
    arrays = {"input_ids": np.arange(20).reshape(10, 2), "mask": np.ones((10, 2))}
    unshuffled = list(make_loader(arrays, 3, seed=0, shuffle=False, drop_remainder=False))
    assert [b["input_ids"].shape[0] for b in unshuffled] == [3, 3, 3, 1]
    assert unshuffled[0]["input_ids"].tolist() == [[0, 1], [2, 3], [4, 5]]
    same = [b["input_ids"].tolist() for b in make_loader(arrays, 5, seed=7)]
    assert same == [b["input_ids"].tolist() for b in make_loader(arrays, 5, seed=7)]
    assert same != [b["input_ids"].tolist() for b in make_loader(arrays, 5, seed=8)]
    with pytest.raises(ValueError, match="different leading sizes"):
        make_loader({"a": np.zeros(3), "b": np.zeros(4)}, 2, seed=0)
