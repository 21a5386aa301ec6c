"""The natural-language suite: labels checked by independent solvers, the verifier as oracle, splits, knobs."""

import dataclasses
import re

import numpy as np
import pytest

from cream_jax.data import natural
from cream_jax.data.natural import NaturalConfig, make_suite
from cream_jax.data.synthetic import EFT_KINDS, Suite, verify
from cream_jax.evaluate import parse_options

SMALL = NaturalConfig(num_sft=30, num_eft=36, num_iterations=2, pool_per_iteration=20, num_test=40)
_SIGN = {"buys": 1, "finds": 1, "gets": 1, "gives": -1, "loses": -1, "sells": -1}


def solve_arith(question: str) -> str:
    """Reads the start amount, then each event sentence's verb and amount, from the text alone."""
    problem = question.split("\n")[0]
    sentences = re.findall(r"[^.?]+[.?]", problem)
    value = int(re.search(r"\d+", sentences[0]).group())
    for s in sentences[1:-1]:
        k = int(re.search(r"\d+", s).group())
        if "times as many" in s:
            value *= k
        else:
            verb = next(w for w in s.split() if w in _SIGN)
            value += _SIGN[verb] * k
    return str(value)


def solve_choice(question: str) -> str:
    """Answers lookup questions from the facts and order questions by sorting the comparison chain."""
    context, rest = question.split("\n\n", 1)[1].split("\nQuestion: ")
    ask = rest.split("\n")[0]
    options = parse_options(rest)
    if ask.startswith("Who is the "):
        greater = dict(re.findall(r"(\w+) is \w+ than (\w+)\.", context))  # a -> the one just below a
        below = set(greater.values())
        top = next(a for a in greater if a not in below)
        bottom = next(b for b in below if b not in greater)
        comparative = re.search(r"is (\w+) than", context).group(1)
        top_word = natural.ORDER_RELATIONS[comparative][0]
        answer = top if ask == top_word else bottom
    else:
        name = next(w.strip("?") for w in ask.split() if w.strip("?") in {n for n, _ in natural.NAMES})
        fact = next(f for f in context.split(". ") if f.startswith(name + " "))
        answer = next(o for o in options if re.search(rf"\b{re.escape(o)}\b", fact))
    return "ABCDE"[options.index(answer)]


@pytest.fixture(scope="module")
def suite() -> Suite:
    return make_suite(SMALL)


def test_labels_agree_with_independent_solvers_and_the_verifier(suite):
    items = [it for task in suite.test.values() for it in task] + [
        {"task": p["task"], "question": p["messages"][0]["content"], "label": p["answer"]} for it in suite.pool
        for p in it]
    for it in items:
        solver = solve_arith if it["task"] == "arith" else solve_choice
        assert solver(it["question"]) == it["label"], it["question"]
    for it in suite.sft:
        user, reply = it["messages"][0]["content"], it["messages"][1]["content"]
        solver = solve_arith if it["task"] == "arith" else solve_choice
        assert verify(it["task"], solver(user), reply) == 1.0, (user, reply)


def test_eft_scores_follow_the_verifier(suite):
    assert {e["kind"] for e in suite.eft} == set(EFT_KINDS)
    for e in suite.eft:
        solver = solve_arith if e["task"] == "arith" else solve_choice
        right = verify(e["task"], solver(e["instruction"]), e["response"])
        # Only "correct" and "no_steps" end with the right answer (rubric: +2 for it).
        assert right == float(e["kind"] in ("correct", "no_steps")), e
        assert e["justification"].endswith(f"Score: {e['score']}")
        assert e["score"] >= 4 if right else e["score"] <= 3


def test_splits_are_disjoint_deterministic_and_sized(suite):
    again = make_suite(SMALL)
    assert again.test == suite.test and again.sft == suite.sft and again.eft == suite.eft
    assert again.pool == suite.pool and suite.pretrain == []
    questions = [it["question"] for t in suite.test.values() for it in t]
    questions += [p["messages"][0]["content"] for it in suite.pool for p in it]
    questions += [it["messages"][0]["content"] for it in suite.sft] + [e["instruction"] for e in suite.eft]
    assert len(questions) == len(set(questions))
    assert [len(p) for p in suite.pool] == [2 * 20] * 2
    assert {k: len(v) for k, v in suite.test.items()} == {"arith": 40, "choice": 40}
    # The test set depends only on seed, knobs and num_test.
    bigger = make_suite(dataclasses.replace(SMALL, num_sft=50, pool_per_iteration=30))
    assert bigger.test == suite.test


def test_labels_are_spread_and_knobs_take_effect():
    s = make_suite(dataclasses.replace(SMALL, choice_num_options=5, choice_num_facts=6, arith_min_ops=3,
                                       arith_max_ops=3, arith_ops=("add", "sub", "mul"), num_test=200))
    letters = [it["label"] for it in s.test["choice"]]
    assert set(letters) == set("ABCDE") and max(np.bincount([ord(x) - 65 for x in letters])) < 0.35 * len(letters)
    for it in s.test["arith"]:
        assert it["question"].count(".") - it["question"].split("\n")[0].count("?") >= 4  # start + 3 events
        assert 0 <= int(it["label"]) <= 60
    assert any("times as many" in it["question"] for it in s.test["arith"])
    assert all(len(parse_options(it["question"])) == 5 for it in s.test["choice"])
    only = make_suite(dataclasses.replace(SMALL, choice_kinds=("order",)))
    assert all("Who is the " in it["question"] for it in only.test["choice"])


@pytest.mark.parametrize("field,value", [("tasks", ("gsm8k",)), ("arith_min_ops", 0), ("choice_num_options", 6),
                                         ("choice_kinds", ("riddle",)), ("num_test", -1)])
def test_bad_knobs_are_one_line_errors(field, value):
    with pytest.raises(ValueError, match=rf"NaturalConfig\.{field}"):
        NaturalConfig(**{field: value})


def test_order_options_need_enough_people():
    with pytest.raises(ValueError, match="choice_num_options"):
        NaturalConfig(choice_num_facts=3, choice_num_options=4)
