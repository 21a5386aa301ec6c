"""cream_jax.judge: templates through a real chat template, score parsing, and both read-outs on a tiny model."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cream_jax import judge
from cream_jax.models.llama import LlamaConfig
from tests._tiny_models import TINY_LLAMA, random_llama, save_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model():
    return random_llama(LlamaConfig(**TINY_LLAMA), seed=3)


def test_judge_prompt_renders_through_chat_template(tok):
    prompts = judge.render_judge_prompts(tok, ["What is 2+3?", "Name a color."], ["5", "Blue."])
    content = judge.JUDGE_TEMPLATE.format(instruction="What is 2+3?", response="5")
    # tests/_tiny_models.py chat template: <s><|user|>{content}</s> then the generation prompt.
    assert prompts[0] == f"<s><|user|>{content}</s><|assistant|>"
    assert "User: Name a color.\n<response>Blue.</response>" in prompts[1]
    assert content.count("point") >= 5 and '"Score: <points>"' in content  # five criteria, output format
    assert judge.judge_messages("q", "a") == [{"role": "user", "content": judge.JUDGE_TEMPLATE.format(instruction="q", response="a")}]
    pair = judge.render_pairwise_prompts(tok, ["Q?"], ["first"], ["second"])[0]
    assert "<response 1>first</response 1>\n<response 2>second</response 2>" in pair
    assert pair.endswith("<|assistant|>")
    with pytest.raises(ValueError, match="render_judge_prompts"):
        judge.render_judge_prompts(tok, ["a", "b"], ["x"])


@pytest.mark.parametrize(
    "text, want",
    [
        ("Relevant and clear.\nScore: 4", 4.0),
        ("score:4", 4.0),
        ("**Score:** 3", 3.0),
        ("**Score**: 2", 2.0),
        ("Score: 4/5", 4.0),
        ("SCORE : 5.", 5.0),
        ("Score: 4.5 points", 4.5),
        ("Score: 0", 0.0),
        ("First draft Score: 1. Revised. Score: 3", 3.0),  # the last label counts
        ("Score: 2 ... final Score: N/A", None),  # last label malformed
        ("Score: 7/10", None),  # another scale
        ("Score: 6", None),  # out of range
        ("Score: -1", None),
        ("Score:", None),
        ("No verdict here, 4 points.", None),  # missing label
        ("Subscore: 3", None),  # not the label
        ("", None),
    ],
)
def test_parse_score(text, want):
    assert judge.parse_score(text) == want


def test_aggregate_sampled_scores():
    nan = np.nan
    scores = np.array([[[4, 5, nan], [nan, nan, nan]], [[0, 1, 2], [3, nan, 3]]], np.float32)
    mean, n_failed = jax.jit(judge.aggregate_sampled_scores)(scores)
    np.testing.assert_allclose(np.asarray(mean), [[4.5, nan], [1.0, 3.0]])
    assert int(n_failed) == 5
    with pytest.raises(ValueError, match="B, R, K"):
        judge.aggregate_sampled_scores(np.zeros((2, 3)))


def test_digit_and_verdict_tokens(tok):
    head, ids = judge.digit_token_ids(tok)
    assert head == "Score: "  # character tokenizer: the space is its own token
    assert tok.convert_ids_to_tokens(ids) == ["0", "1", "2", "3", "4", "5"]
    t1, t2 = judge.verdict_token_ids(tok)
    assert tok.convert_ids_to_tokens([t1, t2]) == ["1", "2"]


def test_expected_score_prompts_cut_judgments(tok):
    prompts, _, missing = judge.expected_score_prompts(
        tok, ["Q1", "Q2", "Q3"], ["A1", "A2", "A3"], judgments=["Good. Score: 4", "Vague.\n**Score:** 2", "Unsure"]
    )
    base = judge.render_judge_prompts(tok, ["Q1"], ["A1"])[0]
    assert prompts[0] == base + "Good. Score: "
    assert prompts[1].endswith("<|assistant|>Vague.\n**Score: ")
    assert prompts[2].endswith("<|assistant|>Unsure\nScore: ")
    assert missing == 1
    direct, _, _ = judge.expected_score_prompts(tok, ["Q1"], ["A1"])
    assert direct == [base + "Score: "]


def _softmax_expectation(logits_v, ids):
    """Hand computation in float64: sum_k k exp(l_k) / sum_j exp(l_j) over the digit tokens."""
    l = np.asarray(logits_v, np.float64)[ids]
    p = np.exp(l - l.max())
    return float((p / p.sum()) @ np.arange(6))


def test_expected_score_on_tiny_model(tok, model):
    prompts, ids, _ = judge.expected_score_prompts(
        tok, ["Add 2 and 3.", "Say hi."], ["It is 5.", "Hello there, how are you?"], judgments=["Correct. Score: 5", "Short"]
    )
    enc = tok(prompts, add_special_tokens=False, padding=True, return_tensors="np")  # left-padded batch
    traces = []

    def read(input_ids, mask):
        traces.append(1)  # runs only while tracing
        return judge.expected_score(model(input_ids, mask)[:, -1], jnp.asarray(ids))

    read_jit = jax.jit(read)
    got = np.asarray(read_jit(enc["input_ids"], enc["attention_mask"]))
    read_jit(enc["input_ids"], enc["attention_mask"])
    assert len(traces) == 1
    forward = jax.jit(lambda input_ids: model(input_ids)[0, -1])
    for b, prompt in enumerate(prompts):  # each prompt alone, unpadded
        logits = np.asarray(forward(tok(prompt, add_special_tokens=False, return_tensors="np")["input_ids"]))
        assert got[b] == pytest.approx(_softmax_expectation(logits, ids), abs=1e-4)
    assert np.all((got >= 0) & (got <= 5))
    with pytest.raises(ValueError, match="digit_token_ids"):
        judge.expected_score(jnp.zeros((2, 10)), jnp.arange(5))


def test_expected_score_is_probability_weighted():
    ids = jnp.array([10, 11, 12, 13, 14, 15])
    logits = jnp.full((3, 20), -1e9).at[0, 14].set(0.0)  # all mass on "4"
    logits = logits.at[1, 10:16].set(0.0)  # uniform: 2.5
    logits = logits.at[2, 10].set(np.log(3.0)).at[2, 15].set(0.0)  # p(0) = 3/4, p(5) = 1/4
    logits = logits.at[2, 0].set(50.0)  # a non-digit token with high probability is ignored
    np.testing.assert_allclose(np.asarray(judge.expected_score(logits, ids)), [4.0, 2.5, 1.25], atol=1e-5)


def test_pairwise_preference():
    rng = np.random.default_rng(0)
    l12, l21 = rng.normal(size=(2, 4, 9)).astype(np.float32)
    t1, t2 = 3, 7
    got = np.asarray(jax.jit(judge.pairwise_preference, static_argnums=(2, 3))(l12, l21, t1, t2))
    e = lambda l, a, b: np.exp(l[:, a]) / (np.exp(l[:, a]) + np.exp(l[:, b]))  # noqa: E731
    np.testing.assert_allclose(got, 0.5 * (e(l12, t1, t2) + e(l21, t2, t1)), atol=1e-6)
    # A judge that always answers "1" (pure position bias) says nothing: p = 1/2.
    biased = np.zeros((2, 9), np.float32)
    biased[:, t1] = 5.0
    np.testing.assert_allclose(np.asarray(judge.pairwise_preference(biased, biased, t1, t2)), 0.5, atol=1e-6)
    grad = jax.grad(lambda a: judge.pairwise_preference(a, l21, t1, t2).sum())(jnp.asarray(l12) * 1e4)
    assert np.all(np.isfinite(np.asarray(grad)))
    with pytest.raises(ValueError, match="pairwise_preference"):
        judge.pairwise_preference(l12, l21[:, :5], t1, t2)


def test_judge_scores_expected_matches_per_prompt_forward(tok, model, caplog):
    """The loop's "expected" read-out: greedy judgment, cut at "Score:", one jitted forward, compiled once."""
    from cream_jax.engine import host, judging  # noqa: PLC0415

    instructions, responses = ["Add 2 and 3.", "Say hi."], [["It is 5.", "6"], ["Hello there.", "Bye"]]
    kwargs = dict(readout="expected", key=jax.random.key(0), tokens=host.TokenSpec.from_tokenizer(tok), max_prompt_len=1400,
                  max_judgment_tokens=6, num_judgments=1, batch_size=2)
    with caplog.at_level(logging.WARNING, logger="cream_jax"):
        judging.judge_scores(model, tok, instructions, responses, **{**kwargs, "max_prompt_len": 300})
    assert "4 of 4 judge prompts were longer than 300 tokens" in caplog.text  # cut prompts are reported
    scores, _ = judging.judge_scores(model, tok, instructions, responses, **kwargs)
    assert scores.shape == (2, 2) and np.all((scores >= 0) & (scores <= 5))
    # the reference: the same greedy judgments, each forced prompt run alone and unpadded
    flat_i = [q for q in instructions for _ in range(2)]
    flat_r = [a for row in responses for a in row]
    enc = host.encode_texts_left_padded(tok, judge.render_judge_prompts(tok, flat_i, flat_r), 1400)
    gen, gen_mask = host.sample_responses(model, enc["input_ids"], enc["attention_mask"], key=jax.random.key(0), num_samples=1,
                                            max_new_tokens=6, temperature=0.0, top_p=1.0, top_k=0,
                                            tokens=kwargs["tokens"], batch_size=2)
    judgments = [t[0] for t in host.decode_responses(tok, gen, gen_mask)]
    forced, ids, _ = judge.expected_score_prompts(tok, flat_i, flat_r, judgments)
    assert max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in forced) <= 1400  # nothing truncated
    for k, prompt in enumerate(forced):
        logits = np.asarray(model(jnp.asarray(tok(prompt, add_special_tokens=False, return_tensors="np")["input_ids"]))[0, -1])
        assert scores.reshape(-1)[k] == pytest.approx(_softmax_expectation(logits, ids), abs=1e-4)
    readout = judging._expected_readout(nnx.split(model)[0])
    before = readout._cache_size()
    again, _ = judging.judge_scores(model, tok, instructions, responses, **kwargs)
    np.testing.assert_array_equal(again, scores)
    assert readout._cache_size() == before  # no new compilation for the same shapes



@pytest.mark.parametrize("readout", ["expected", "sample"])
def test_judge_scores_decode_with_the_configured_layers(tok, model, monkeypatch, readout):
    """Sampling.layers reaches the judgments' decode, and the scanned program judges as the unrolled one."""
    from cream_jax.engine import host, judging  # noqa: PLC0415

    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs["layers"])
        return host.sample_responses(*args, **kwargs)

    monkeypatch.setattr(judging, "sample_responses", recording)
    instructions, responses = ["Add 2 and 3."], [["It is 5.", "6"]]
    kwargs = dict(readout=readout, key=jax.random.key(0), tokens=host.TokenSpec.from_tokenizer(tok), max_prompt_len=1400,
                  max_judgment_tokens=6, num_judgments=2, batch_size=2)
    unrolled, _ = judging.judge_scores(model, tok, instructions, responses, **kwargs)
    scanned, _ = judging.judge_scores(model, tok, instructions, responses, layers="scan", **kwargs)
    assert seen == ["unroll", "scan"]
    np.testing.assert_allclose(scanned, unrolled, atol=1e-4)  # NaN (unparsed) in the same places


def test_compact_template_fits_small_contexts_and_bad_names_fail(tok):
    full = judge.render_judge_prompts(tok, ["What is 2+3?"], ["5"])[0]
    compact = judge.render_judge_prompts(tok, ["What is 2+3?"], ["5"], template="compact")[0]
    assert "User: What is 2+3?\n<response>5</response>" in compact and '"Score: <points>"' in compact
    assert len(tok.encode(compact, add_special_tokens=False)) < len(tok.encode(full, add_special_tokens=False)) / 4
    prompts, _, _ = judge.expected_score_prompts(tok, ["Q"], ["A"], ["Fine. Score: 3"], template="compact")
    assert prompts[0].startswith(judge.render_judge_prompts(tok, ["Q"], ["A"], template="compact")[0])
    with pytest.raises(ValueError, match="judge template 'short' is not one of 'additive', 'compact'"):
        judge.judge_messages("q", "a", template="short")
