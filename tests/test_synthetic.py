"""The embedded suite: determinism, disjoint splits, labels checked by an independent solver, knobs."""

import dataclasses
import re

import numpy as np
import pytest

from cream_jax.data.synthetic import (
    EFT_KINDS,
    RELATION_TEMPLATES,
    SuiteConfig,
    make_suite,
    oracle_reward,
    verify,
)

SMALL = SuiteConfig(num_pretrain=300, num_sft=40, num_eft=30, num_iterations=2, pool_per_iteration=25, num_test=50)

_NUM_WORDS = {"gets": "+", "finds": "+", "buys": "+", "gives": "-", "loses": "-", "sells": "-", "makes": "*"}


def solve_arith(question: str) -> str:
    """Independent solver: reads the start amount and each operation sentence from the text."""
    sentences = re.findall(r"[^.?]+[.?]", question)
    value = int(re.search(r"\d+", sentences[0]).group())
    for s in sentences[1:-1]:
        verb = s.split()[1]
        k = int(re.search(r"\d+", s).group())
        value = {"+": value + k, "-": value - k, "*": value * k}[_NUM_WORDS[verb]]
    return str(value)


def solve_choice(question: str) -> str:
    """Independent solver: finds the fact the question asks about and the option naming it."""
    context, rest = question[len("Context: "):].split(" Question: ")
    ask, opts = rest.split(" (A) ")
    options = ("(A) " + opts)
    options = dict(re.findall(r"\(([A-E])\) (\S+)", options))
    for fact, who_q, what_q, _ in RELATION_TEMPLATES.values():
        who = re.fullmatch(who_q.replace("{v}", "(\\w+)").replace("?", "\\?"), ask)
        what = re.fullmatch(what_q.replace("{name}", "(\\w+)").replace("?", "\\?"), ask)
        pattern = fact.replace("{name}", "(\\w+)").replace("{v}", "(\\w+)").replace(".", "\\.")
        facts = re.findall(pattern, context)
        if facts and who:
            answer = [n for n, v in facts if v == who.group(1)]
        elif facts and what:
            answer = [v for n, v in facts if n == what.group(1)]
        else:
            continue
        assert len(answer) == 1, question
        (letter,) = [k for k, v in options.items() if v == answer[0]]
        return letter
    raise AssertionError(f"unparsed question {question!r}")


SOLVERS = {"arith": solve_arith, "choice": solve_choice}


def _questions(suite):
    out = {"test": [], "pool": [], "sft": [], "eft": [], "pretrain": []}
    out["test"] = [x["question"] for items in suite.test.values() for x in items]
    out["pool"] = [x["messages"][0]["content"] for sub in suite.pool for x in sub]
    out["sft"] = [x["messages"][0]["content"] for x in suite.sft]
    out["eft"] = [x["instruction"] for x in suite.eft]
    out["pretrain"] = [x["text"].split("\n")[0] if "text" in x else x["messages"][0]["content"] for x in suite.pretrain]
    return out


@pytest.fixture(scope="module")
def suite():
    return make_suite(SMALL)


def test_same_seed_same_suite_other_seed_differs(suite):
    assert make_suite(SMALL) == suite
    other = make_suite(dataclasses.replace(SMALL, seed=1))
    assert other.test != suite.test and other.pretrain != suite.pretrain


def test_sizes(suite):
    assert {t: len(v) for t, v in suite.test.items()} == {"arith": 50, "choice": 50}
    assert [len(s) for s in suite.pool] == [50, 50]
    assert len(suite.sft) == 80 and len(suite.eft) == 60 and len(suite.pretrain) == 600
    n_chat = sum("messages" in x for x in suite.pretrain)
    assert 0.35 < n_chat / 600 < 0.65  # pretrain_chat_fraction = 0.5


def test_splits_are_disjoint_and_ids_unique(suite):
    q = _questions(suite)
    names = list(q)
    for i, a in enumerate(names):
        assert len(set(q[a])) == len(q[a]), a
        for b in names[i + 1:]:
            assert not set(q[a]) & set(q[b]), (a, b)
    ids = [x["id"] for v in suite.test.values() for x in v] + [x["id"] for s in suite.pool for x in s]
    ids += [x["id"] for x in suite.sft] + [x["id"] for x in suite.eft]
    assert len(ids) == len(set(ids))


def test_test_set_does_not_depend_on_other_split_sizes(suite):
    bigger = make_suite(dataclasses.replace(SMALL, num_pretrain=500, num_sft=7))
    assert bigger.test == suite.test


def test_labels_agree_with_an_independent_solver(suite):
    for task, items in suite.test.items():
        for x in items:
            assert SOLVERS[task](x["question"]) == x["label"], x
    for sub in suite.pool:
        for x in sub:
            assert SOLVERS[x["task"]](x["messages"][0]["content"]) == x["answer"], x
    for x in suite.sft:
        label = SOLVERS[x["task"]](x["messages"][0]["content"])
        assert verify(x["task"], label, x["messages"][1]["content"]) == 1.0, x


def test_arith_solutions_show_correct_steps(suite):
    for x in suite.sft:
        if x["task"] != "arith":
            continue
        answer = x["messages"][1]["content"]
        steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", answer)
        assert steps
        for a, op, b, r in steps:
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(r)
        assert answer.endswith(f"The answer is {steps[-1][3]}.")


def test_eft_scores_follow_the_rubric(suite):
    expected = {"correct": 5, "no_steps": 4, "wrong_final": 3, "wrong": 2, "malformed": 1, "off_topic": 1}
    kinds = [x["kind"] for x in suite.eft]
    for kind in EFT_KINDS:
        assert kinds.count(kind) == 10  # 30 per task, balanced over 6 kinds
    for x in suite.eft:
        assert x["score"] == expected[x["kind"]]
        assert x["justification"].endswith(f"Score: {x['score']}")
        label = SOLVERS[x["task"]](x["instruction"])
        # The oracle agrees: only "correct" and "no_steps" answers are right.
        assert verify(x["task"], label, x["response"]) == float(x["kind"] in ("correct", "no_steps")), x


def test_verify_and_oracle_reward_by_hand():
    assert verify("arith", "7", "3 + 4 = 7. The answer is 7.") == 1.0
    assert verify("arith", "7", "3 + 4 = 7.") == 0.0
    assert verify("arith", "7", "The answer is 8.") == 0.0
    assert verify("choice", "B", "Bob wears blue. The answer is (B).") == 1.0
    assert verify("choice", "B", "Bob wears blue. The answer is (C).") == 0.0
    r = oracle_reward(["arith", "choice"], ["7", "A"], [["The answer is 7.", "no"], ["The answer is (A).", "The answer is B."]])
    np.testing.assert_array_equal(r, np.array([[1, 0], [1, 0]], np.float32))
    assert r.dtype == np.float32 and r.shape == (2, 2)
    with pytest.raises(ValueError, match="different lengths"):
        oracle_reward(["arith", "arith"], ["1", "2"], [["a"], ["b", "c"]])


def test_knobs():
    cfg = SuiteConfig(num_pretrain=0, num_sft=0, num_eft=0, num_iterations=1, pool_per_iteration=0, num_test=60,
                      arith_min_ops=3, arith_max_ops=3, arith_max_operand=5, arith_max_value=30,
                      arith_ops=("add", "mul"), choice_num_facts=4, choice_num_options=5,
                      choice_distractors="outside", choice_relations=("pet",), choice_question_types=("what",))
    s = make_suite(cfg)
    for x in s.test["arith"]:
        assert x["question"].count(".") == 4 and int(x["label"]) <= 30  # start + 3 operations
        assert not re.search(r"gives|loses|sells", x["question"])
        assert solve_arith(x["question"]) == x["label"]
    for x in s.test["choice"]:
        options = re.findall(r"\(([A-E])\) (\w+)", x["question"])
        assert len(options) == 5 and x["question"].count(" has a ") == 4
        context = x["question"].split(" Question: ")[0]
        # "outside" distractors never occur in the context: only the answer does.
        in_context = [letter for letter, v in options if f" {v}." in context]
        assert in_context == [x["label"]]
        assert solve_choice(x["question"]) == x["label"]


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("tasks", ("arith", "poetry"), "SuiteConfig.tasks"),
        ("choice_num_options", 6, "SuiteConfig.choice_num_options"),
        ("arith_ops", ("div",), "SuiteConfig.arith_ops"),
        ("choice_distractors", "random", "SuiteConfig.choice_distractors"),
        ("arith_min_ops", 3, "SuiteConfig.arith_min_ops"),
        ("num_iterations", 0, "SuiteConfig.num_iterations"),
    ],
)
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SMALL, **{field: value})


def test_too_many_questions_for_the_knobs_is_an_error():
    cfg = SuiteConfig(tasks=("arith",), arith_min_ops=1, arith_max_ops=1, arith_max_operand=2, arith_max_value=3,
                      arith_ops=("add",), num_pretrain=0, num_sft=0, num_eft=0, pool_per_iteration=0, num_test=5000)
    with pytest.raises(ValueError, match="cannot draw 5000 distinct 'arith' questions"):
        make_suite(cfg)
