"""Answer extractors (default and CREAM-official, METHODS 2.7-6), accuracy and the evaluate loop."""

import jax
import numpy as np
import pytest

from cream_jax.evaluate import (
    accuracy,
    evaluate,
    extract_answer,
    is_correct,
    normalize_label,
    normalize_number,
    parse_options,
    select_by_likelihood,
    task_kind,
)
from cream_jax import sharding
from cream_jax.engine import batching

DEFAULT_CHOICE = [
    ("Bob wears blue. The answer is (B).", "B"),
    ("The answer is B.", "B"),
    ("the answer is (c)", "C"),
    ("Answer: D", "D"),
    ("answer:(e)", "E"),  # E is readable, unlike the official extractor
    ("The answer is A. Then again the answer is (C).", "C"),  # last marker wins
    ("The correct option is D, not a guess.", None),  # no marker: no answer
    ("The answer is a dog.", None),  # a lower-case bare "a" is the article
    ("The answer is Bob.\nA is wrong.", None),  # the option must be on the marker's line
    ("The answer is: Bob (B).", "B"),
    ("The final answer is (2).", "2"),  # numeric option labels (raw ARC)
    ("", None),
]

DEFAULT_NUMERIC = [
    ("3 + 4 = 7. The answer is 7.", "7"),
    ("The answer is 1,234.", "1234"),
    ("The answer is $7.00", "7"),
    ("The answer is 7.50 dollars", "7.5"),
    ("The answer is -3.", "-3"),
    ("The answer is 007", "7"),
    ("#### 42", "42"),
    ("Answer: 5. The answer is 6.", "6"),  # last marker wins
    ("3 + 4 = 7.", None),  # no marker
    ("The answer is seven.", None),
    ("The answer is -0.0", "0"),
]

OFFICIAL_CHOICE = [
    ("The correct option is D, not a guess.", "A"),  # the article "a" bug
    ("Answer: C. I am not sure it is a", "C"),  # the first "answer:" wins
    ("Answer: B ... later Answer: C", "B"),
    ("The answer is (B).", "B"),  # falls back to the last standalone letter
    ("The answer is (E).", None),  # E cannot be extracted
    ("i think b or c", "C"),
    ("answer: ab, b", "B"),  # "answer: a" needs a word boundary; the last standalone letter is b
    ("No letters here.", None),
]

OFFICIAL_NUMERIC = [
    ("the answer is 7. 3 + 4 = 7", "7"),
    ("First 5 apples, then answer: 9 and answer is 10", "9"),  # "answer:" is tried before "answer is"
    ("#### 1,000", "1000"),
    ("Answer is 12.00", "12"),
    ("We have 3 and 4 so 7", "7"),  # no marker: the last number
    ("The answer is 2.5", "2.5"),  # the official code raises TypeError here
    ("answer is nothing", None),
    ("\nAnswer 8 and 9", "9"),  # "\nAnswer" never matches after lower-casing
]


@pytest.mark.parametrize("response,expected", DEFAULT_CHOICE)
def test_default_choice(response, expected):
    assert extract_answer(response, "choice") == expected


@pytest.mark.parametrize("response,expected", DEFAULT_NUMERIC)
def test_default_numeric(response, expected):
    assert extract_answer(response, "numeric") == expected


@pytest.mark.parametrize("response,expected", OFFICIAL_CHOICE)
def test_official_choice(response, expected):
    assert extract_answer(response, "choice", "cream_official") == expected


@pytest.mark.parametrize("response,expected", OFFICIAL_NUMERIC)
def test_official_numeric(response, expected):
    assert extract_answer(response, "numeric", "cream_official") == expected


def test_official_and_default_disagree_on_the_article_bug():
    text = "The answer is D, not a guess."
    assert extract_answer(text, "choice") == "D"
    assert extract_answer(text, "choice", "cream_official") == "A"
    assert is_correct("The correct option is D, not a guess.", "a", "choice", "cream_official")
    assert not is_correct("The correct option is D, not a guess.", "D", "choice")


def test_labels_and_numbers():
    assert normalize_label("(b)", "choice") == "B"
    assert normalize_label(7, "numeric") == "7"
    assert normalize_label("1,000.0", "numeric") == "1000"
    assert normalize_number("12.3400") == "12.34"
    assert normalize_number("abc") is None
    assert is_correct("The answer is 1000.", "1,000", "numeric")
    assert task_kind("arith") == "numeric" and task_kind("siqa") == "choice" and task_kind("choice") == "choice"
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        task_kind("nope")
    with pytest.raises(ValueError, match="extractor"):
        extract_answer("x", "choice", "bogus")


def test_accuracy():
    responses = ["The answer is 7.", "The answer is 8.", "7", "The answer is 7.0"]
    assert accuracy(responses, ["7", "7", "7", 7], "numeric") == 0.5
    # The official extractor reads the bare "7" (last number), the default does not.
    assert accuracy(responses, ["7", "7", "7", 7], "numeric", "cream_official") == 0.75
    with pytest.raises(ValueError, match="3 responses but 2 labels"):
        accuracy(["a", "b", "c"], ["A", "B"], "choice")


def test_parse_options():
    q = "Context: Ann wears red. Question: Who wears red? (A) Cid (B) Ann (C) Bob"
    assert parse_options(q) == ["Cid", "Ann", "Bob"]
    assert parse_options("no options") == []


def test_select_by_likelihood_ties_go_first():
    def score_fn(prompts, options):
        return np.array([[0.0, 2.0, 2.0], [-1.0, -3.0, -0.5]])

    assert select_by_likelihood(score_fn, [[{}], [{}]], [["a", "b", "c"]] * 2) == ["B", "C"]


def test_evaluate_batches_and_scores():
    calls = []
    answers = {"q1": "The answer is 3.", "q2": "The answer is 5.", "q3": "I do not know."}

    def generate_fn(batch):
        calls.append(len(batch))
        return [answers[m[0]["content"]] for m in batch]

    sets = {"arith": [{"id": i, "question": f"q{i}", "label": lab} for i, lab in ((1, "3"), (2, "4"), (3, "1"))]}
    acc, outputs = evaluate(generate_fn, sets, batch_size=2, return_outputs=True)
    assert acc == {"arith": pytest.approx(1 / 3)}
    assert calls == [2, 1]  # the last batch is not padded here (the engine pads to its mesh bucket)
    assert [o["correct"] for o in outputs["arith"]] == [True, False, False]
    assert outputs["arith"][1]["prediction"] == "5" and outputs["arith"][1]["question"] == "q2"
    calls.clear()
    assert evaluate(generate_fn, sets, batch_size=10**9) == acc  # one call of the set's size, no padding
    assert calls == [3]


def test_evaluate_flat_list_suffix_and_likelihood_mode():
    seen = []

    def generate_fn(batch):
        seen.extend(m[0]["content"] for m in batch)
        return ["The answer is (B)."] * len(batch)

    items = [
        {"id": "c1", "question": "Who? (A) x (B) y (C) z", "label": "B", "task": "choice"},
        {"id": "c2", "question": "Who? (A) x (B) y (C) z", "label": "C", "task": "choice"},
        {"id": "a1", "question": "How many?", "label": "2", "task": "arith"},
    ]
    acc = evaluate(generate_fn, items, batch_size=4, suffix=" Think.")
    assert acc == {"choice": 0.5, "arith": 0.0}
    assert seen[0] == "Who? (A) x (B) y (C) z Think."

    def score_fn(prompts, options):
        assert options[0] == ["x", "y", "z"]
        return [[0.0, 0.0, 1.0]] * len(prompts)

    acc = evaluate(generate_fn, items, batch_size=4, score_fn=score_fn)
    assert acc == {"choice": 0.5, "arith": 0.0}  # choice answered "C" by likelihood, arith generated
    chat_items = [{"id": "m", "messages": [{"role": "user", "content": "Who? (A) x (B) y"}], "label": "B", "task": "choice"}]
    assert evaluate(generate_fn, chat_items, batch_size=4, suffix="!") == {"choice": 1.0}
    assert seen[-1] == "Who? (A) x (B) y!"
    with pytest.raises(ValueError, match="item 'z' of 'arith' has neither 'question' nor 'messages'"):
        evaluate(generate_fn, {"arith": [{"id": "z", "label": "1"}]}, batch_size=1)


def test_eval_rows_reach_the_program_padded_only_to_the_mesh_bucket():
    """Rows the jitted program runs per call, on 8 devices (data=8), through the engine's batching:
    18 items at batch size 16 run 16 + 8 rows (not 16 + 16), 10 items at batch size 128 run 16 (not
    128); the shapes repeat, so a second evaluation compiles nothing."""
    mesh = sharding.make_mesh(data=8)
    rows, traces = [], []

    @jax.jit
    def program(x):
        traces.append(x.shape)  # runs once per compiled shape
        return x * 0 + 7

    def generate_fn_for(batch_size):  # as the loop binds it: one Eval.batch_size for both
        def generate_fn(batch):
            def run(x):
                rows.append(x.shape[0])
                return program(x)

            return ["The answer is %d." % v for v in batching.map_batched(run, [np.arange(len(batch))], mesh, batch_size)]

        return generate_fn

    for n, batch_size, want in ((18, 16, [16, 8]), (10, 128, [16])):
        sets = {"arith": [{"id": i, "question": f"q{i}", "label": "7"} for i in range(n)]}
        rows.clear()
        assert evaluate(generate_fn_for(batch_size), sets, batch_size=batch_size) == {"arith": 1.0}
        assert rows == want
    compiled = len(traces)
    evaluate(generate_fn_for(16), {"arith": [{"id": i, "question": "q", "label": "7"} for i in range(18)]}, batch_size=16)
    assert len(traces) == compiled
