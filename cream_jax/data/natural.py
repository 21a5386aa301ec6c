"""Natural-language verifiable tasks for a real instruct model (docs/natural_suite.md).

The embedded suite's two tasks (`cream_jax.data.synthetic`) written as an instruct model reads
them: full sentences, varied names, objects and verbs, an explicit instruction on how to answer,
and options one per line. Task names and labels are the embedded suite's ("arith" -> a number,
"choice" -> a letter), so `cream_jax.data.synthetic.verify` is the oracle and `make_suite`
returns the same `Suite` (``pretrain`` is empty: a real model is its own M0)::

    Maya has 14 stickers. She buys 9 more. Then she gives 6 to a friend. How many stickers does
    Maya have now?
    Solve the problem step by step. End your reply with "The answer is" and the number.
    -> Maya starts with 14 stickers. After buying 9 more, she has 14 + 9 = 23. After giving 6 to a
       friend, she has 23 - 6 = 17. The answer is 17.

    Answer the multiple-choice question. End your reply with "The answer is" and the letter of the
    correct option in parentheses.

    Liam is older than Noah. Emma is older than Liam.
    Question: Who is the youngest?
    (A) Emma
    (B) Noah
    (C) Liam
    -> Emma is older than Liam and Liam is older than Noah, so Noah is the youngest. The answer is (B).

Choice questions are "lookup" (a fact of the context answers them; the distractors are other
values of the context) or "order" (a chain of comparisons; the question asks for one end).
Difficulty knobs: number of operations, operand and value ranges, operations; number of facts,
number of options, question kinds. `NaturalConfig`'s defaults are the knobs calibrated on
SmolLM2-135M-Instruct (docs/natural_suite.md records the measured accuracies).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from cream_jax.data.synthetic import EFT_KINDS, LETTERS, Suite, eft_justification, final_sentence

TASKS = ("arith", "choice")
ARITH_OPS = ("add", "sub", "mul")
CHOICE_KINDS = ("lookup", "order")

NAMES = (
    ("Anna", "she"), ("Ben", "he"), ("Carla", "she"), ("David", "he"), ("Emma", "she"), ("Felix", "he"),
    ("Grace", "she"), ("Henry", "he"), ("Iris", "she"), ("Jack", "he"), ("Kate", "she"), ("Liam", "he"),
    ("Maya", "she"), ("Noah", "he"), ("Olivia", "she"), ("Paul", "he"), ("Rosa", "she"), ("Sam", "he"),
    ("Tina", "she"), ("Victor", "he"),
)
OBJECTS = ("apples", "stickers", "marbles", "books", "pencils", "cookies", "stamps", "coins", "shells", "cards")
# op -> (problem clause, solution clause); {p} pronoun, {k} amount.
ARITH_EVENTS = {
    "add": (("buys {k} more", "buying {k} more"), ("finds {k} more", "finding {k} more"),
            ("gets {k} more from a friend", "getting {k} more")),
    "sub": (("gives {k} to a friend", "giving {k} to a friend"), ("loses {k}", "losing {k}"),
            ("sells {k}", "selling {k}")),
    "mul": (("ends up with {k} times as many", "multiplying by {k}"),),
}
ARITH_SYMBOLS = {"add": "+", "sub": "-", "mul": "*"}
ARITH_CONNECTORS = ("Then", "After that,", "Later,")
ARITH_INSTRUCTION = 'Solve the problem step by step. End your reply with "The answer is" and the number.'
# Before the options, so that the last option's text ends the question (`evaluate.parse_options`).
CHOICE_INSTRUCTION = ('Answer the multiple-choice question. End your reply with "The answer is" and the letter of '
                      'the correct option in parentheses.')
# relation -> (fact, question about a person, values)
LOOKUP_RELATIONS = {
    "city": ("{name} lives in {v}.", "Where does {name} live?",
             ("Rome", "Oslo", "Lima", "Cairo", "Paris", "Tokyo", "Delhi", "Quito")),
    "pet": ("{name} has a {v}.", "What pet does {name} have?",
            ("cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goldfish", "horse")),
    "job": ("{name} works as a {v}.", "What is the job of {name}?",
            ("doctor", "teacher", "pilot", "baker", "farmer", "painter", "nurse", "lawyer")),
    "sport": ("{name} plays {v}.", "Which sport does {name} play?",
              ("tennis", "soccer", "chess", "golf", "hockey", "rugby", "cricket", "volleyball")),
}
# comparative -> (fact "x is <comp> than y", question for the top, question for the bottom)
ORDER_RELATIONS = {
    "older": ("Who is the oldest?", "Who is the youngest?"),
    "taller": ("Who is the tallest?", "Who is the shortest?"),
    "faster": ("Who is the fastest?", "Who is the slowest?"),
}


@dataclasses.dataclass(frozen=True)
class NaturalConfig:
    """Knobs of the natural-language suite; sizes are per task (as `synthetic.SuiteConfig`).

    Attributes:
      seed: seed of every random choice.
      tasks: subset of TASKS.
      arith_min_ops, arith_max_ops: operations per word problem (uniform in range).
      arith_max_operand: amounts added or taken are drawn from 2..this; the start from 2..this.
      arith_max_value: cap on every intermediate and final value.
      arith_ops: subset of ARITH_OPS ("mul" multiplies by 2..3).
      choice_kinds: subset of CHOICE_KINDS.
      choice_num_facts: facts in a lookup context; people in an order chain.
      choice_num_options: options per question, 3..5 (at most choice_num_facts for "order").
      num_sft, num_eft, num_iterations, pool_per_iteration, num_test: split sizes.
    """

    seed: int = 0
    tasks: tuple[str, ...] = TASKS
    arith_min_ops: int = 1
    arith_max_ops: int = 2
    arith_max_operand: int = 9
    arith_max_value: int = 20
    arith_ops: tuple[str, ...] = ("add", "sub")
    choice_kinds: tuple[str, ...] = CHOICE_KINDS
    choice_num_facts: int = 3
    choice_num_options: int = 3
    num_sft: int = 64
    num_eft: int = 60
    num_iterations: int = 3
    pool_per_iteration: int = 32
    num_test: int = 100

    def __post_init__(self):
        def need(ok: bool, field: str, what: str):
            if not ok:
                raise ValueError(f"NaturalConfig.{field}: {what}, got {getattr(self, field)!r}")

        need(len(self.tasks) > 0 and set(self.tasks) <= set(TASKS), "tasks", f"must be a non-empty subset of {TASKS}")
        need(1 <= self.arith_min_ops <= self.arith_max_ops, "arith_min_ops", "must be in 1..arith_max_ops")
        need(self.arith_max_operand >= 2, "arith_max_operand", "must be >= 2")
        need(self.arith_max_value >= 4, "arith_max_value", "must be >= 4")
        need(len(self.arith_ops) > 0 and set(self.arith_ops) <= set(ARITH_OPS), "arith_ops",
             f"must be a non-empty subset of {ARITH_OPS}")
        need(len(self.choice_kinds) > 0 and set(self.choice_kinds) <= set(CHOICE_KINDS), "choice_kinds",
             f"must be a non-empty subset of {CHOICE_KINDS}")
        need(2 <= self.choice_num_facts <= 8, "choice_num_facts", "must be in 2..8")
        need(3 <= self.choice_num_options <= 5, "choice_num_options", "must be in 3..5")
        need("order" not in self.choice_kinds or self.choice_num_options <= self.choice_num_facts,
             "choice_num_options", "must be <= choice_num_facts for 'order' questions (options are the people)")
        for field in ("num_sft", "num_eft", "pool_per_iteration", "num_test"):
            need(getattr(self, field) >= 0, field, "must be >= 0")
        need(self.num_iterations >= 1, "num_iterations", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One question: its prompt, worked steps, label, and what a wrong response would claim."""

    task: str
    question: str  # the whole user turn, instruction included
    steps: tuple[str, ...]
    label: str
    wrong_steps: tuple[str, ...]  # arith: an error in the first step carried on; choice: a false claim
    wrong_label: str  # the final answer wrong_steps lead to

    @property
    def solution(self) -> str:
        return " ".join(self.steps + (final_sentence(self.task, self.label),))


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _arith_problem(cfg: NaturalConfig, rng: np.random.Generator) -> Problem:
    cap = cfg.arith_max_value
    n_ops = int(rng.integers(cfg.arith_min_ops, cfg.arith_max_ops + 1))
    for _ in range(100):  # redraw when no allowed operation fits (every problem has n_ops steps)
        name, pron = _pick(rng, NAMES)
        obj = _pick(rng, OBJECTS)
        value = int(rng.integers(2, min(cfg.arith_max_operand, cap) + 1))
        sentences = [f"{name} has {value} {obj}."]
        chain = []  # (op, k, solution clause)
        for j in range(n_ops):
            ranges = {"add": (2, min(cfg.arith_max_operand, cap - value)),
                      "sub": (2, min(cfg.arith_max_operand, value - 1)),
                      "mul": (2, min(3, cap // max(value, 1)))}
            feasible = [op for op in cfg.arith_ops if ranges[op][0] <= ranges[op][1]]
            if not feasible:
                break
            op = _pick(rng, feasible)
            k = int(rng.integers(ranges[op][0], ranges[op][1] + 1))
            ask, tell = _pick(rng, ARITH_EVENTS[op])
            lead = pron.capitalize() if j == 0 else f"{_pick(rng, ARITH_CONNECTORS)} {pron}"
            sentences.append(f"{lead} {ask.format(k=k)}.")
            chain.append((op, k, tell.format(k=k)))
            value = {"add": value + k, "sub": value - k, "mul": value * k}[op]
        if len(chain) == n_ops:
            break
    else:
        raise ValueError(f"NaturalConfig: {n_ops} operations of {cfg.arith_ops} rarely fit arith_max_value={cap}")
    start = int(sentences[0].split(" ")[2])
    sentences.append(f"How many {obj} does {name} have now?")

    def worked(error: int) -> tuple[tuple[str, ...], int]:
        v, out = start, [f"{name} starts with {start} {obj}."]
        for j, (op, k, tell) in enumerate(chain):
            new = {"add": v + k, "sub": v - k, "mul": v * k}[op] + (error if j == 0 else 0)
            out.append(f"After {tell}, {pron} has {v} {ARITH_SYMBOLS[op]} {k} = {new}.")
            v = new
        return tuple(out), v

    steps, answer = worked(0)
    wrong_steps, wrong_answer = worked(_pick(rng, (-2, -1, 1, 2)))
    question = " ".join(sentences) + "\n" + ARITH_INSTRUCTION
    return Problem("arith", question, steps, str(answer), wrong_steps, str(wrong_answer))


def _options_text(options: Sequence[str]) -> str:
    return "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))


def _choice_problem(cfg: NaturalConfig, rng: np.random.Generator) -> Problem:
    kind = _pick(rng, cfg.choice_kinds)
    n_facts, n_opt = cfg.choice_num_facts, cfg.choice_num_options
    names = [NAMES[i][0] for i in rng.permutation(len(NAMES))[:n_facts]]
    if kind == "lookup":
        fact, ask, values = LOOKUP_RELATIONS[_pick(rng, sorted(LOOKUP_RELATIONS))]
        held = [values[i] for i in rng.permutation(len(values))[:max(n_facts, n_opt)]]
        target = int(rng.integers(n_facts))
        context = " ".join(fact.format(name=n, v=v) for n, v in zip(names, held))
        answer = held[target]
        # Distractors: other values of the context first, then values no one holds.
        others = [held[i] for i in rng.permutation(n_facts) if i != target] + held[n_facts:]
        options = [answer] + others[:n_opt - 1]
        question = ask.format(name=names[target])
        claim = lambda o: fact.format(name=names[target], v=o)  # noqa: E731
        reason = lambda o: f"{claim(o)[:-1]}, which is option ({LETTERS[options_shown.index(o)]})."  # noqa: E731
    else:
        comparative = _pick(rng, sorted(ORDER_RELATIONS))
        top_q, bottom_q = ORDER_RELATIONS[comparative]
        pairs = [f"{a} is {comparative} than {b}." for a, b in zip(names[:-1], names[1:])]
        context = " ".join(pairs[i] for i in rng.permutation(len(pairs)))
        ask_top = bool(rng.integers(2))
        answer = names[0] if ask_top else names[-1]
        options = [answer] + [names[i] for i in rng.permutation(n_facts) if names[i] != answer][:n_opt - 1]
        question = top_q if ask_top else bottom_q
        chain = " and ".join(p[:-1] for p in pairs)
        superlative = question[len("Who is the "):-1]
        reason = lambda o: f"{chain}, so {o} is the {superlative}."  # noqa: E731
    options_shown = [options[i] for i in rng.permutation(n_opt)]
    label = LETTERS[options_shown.index(answer)]
    wrong = _pick(rng, [o for o in options_shown if o != answer])
    text = f"{CHOICE_INSTRUCTION}\n\n{context}\nQuestion: {question}\n{_options_text(options_shown)}"
    return Problem("choice", text, (reason(answer),), label, (reason(wrong),),
                   LETTERS[options_shown.index(wrong)])


_GENERATORS = {"arith": _arith_problem, "choice": _choice_problem}


def _eft_response(kind: str, p: Problem, cfg: NaturalConfig, rng: np.random.Generator) -> str:
    """A candidate answer of an EFT kind; its oracle score is `synthetic.eft_justification`'s."""
    if kind == "correct":
        return p.solution
    if kind == "no_steps":
        return final_sentence(p.task, p.label)
    if kind == "wrong_final":
        return " ".join(p.steps + (final_sentence(p.task, p.wrong_label),))
    if kind == "wrong":
        return " ".join(p.wrong_steps + (final_sentence(p.task, p.wrong_label),))
    if kind == "malformed":  # cut inside the first worked step: nothing finished, no final answer
        words = p.steps[min(1, len(p.steps) - 1)].split(" ")
        return " ".join(words[: max(1, len(words) // 2)])
    for _ in range(1000):  # off_topic: the solution of another question with another answer
        other = _GENERATORS[p.task](cfg, rng)
        if other.label != p.label:
            return other.solution
    raise ValueError(f"NaturalConfig: the {p.task!r} knobs leave a single possible answer")


def _distinct(task: str, cfg: NaturalConfig, rng: np.random.Generator, count: int) -> list[Problem]:
    seen: set[str] = set()
    out: list[Problem] = []
    misses = 0
    while len(out) < count:
        p = _GENERATORS[task](cfg, rng)
        if p.question in seen:
            misses += 1
            if misses > 2000:
                raise ValueError(f"NaturalConfig: cannot draw {count} distinct {task!r} questions (got {len(out)}); "
                                 f"widen the knobs or lower the split sizes")
            continue
        misses = 0
        seen.add(p.question)
        out.append(p)
    return out


def _chat(question: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": question}]
    return messages + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def make_suite(cfg: NaturalConfig = NaturalConfig()) -> Suite:
    """The natural-language suite, deterministic in ``cfg`` (same layout as `synthetic.make_suite`).

    Per task one stream of distinct questions is cut into test, pool, SFT and EFT splits in that
    order, so the test set depends only on the seed, the knobs and ``num_test``. ``pretrain`` is
    empty. Test items carry "question" (the user turn) and "messages".
    """
    sft, eft, test = [], [], {}
    pool: list[list[dict]] = [[] for _ in range(cfg.num_iterations)]
    for task in cfg.tasks:
        rng = np.random.default_rng([cfg.seed, TASKS.index(task), 1])  # 1: not the embedded suite's stream
        sizes = (cfg.num_test, cfg.num_iterations * cfg.pool_per_iteration, cfg.num_sft, cfg.num_eft)
        cuts = np.cumsum((0,) + sizes)
        problems = _distinct(task, cfg, rng, int(cuts[-1]))
        test_p, pool_p, sft_p, eft_p = (problems[a:b] for a, b in zip(cuts[:-1], cuts[1:]))
        test[task] = [{"id": f"{task}-test-{i}", "task": task, "question": p.question, "label": p.label,
                       "messages": _chat(p.question)} for i, p in enumerate(test_p)]
        for i, p in enumerate(pool_p):
            pool[i // cfg.pool_per_iteration].append(
                {"id": f"{task}-pool-{i}", "task": task, "messages": _chat(p.question), "answer": p.label})
        sft += [{"id": f"{task}-sft-{i}", "task": task, "messages": _chat(p.question, p.solution)}
                for i, p in enumerate(sft_p)]
        kinds = [EFT_KINDS[i % len(EFT_KINDS)] for i in rng.permutation(len(eft_p))]
        for i, (p, kind) in enumerate(zip(eft_p, kinds)):
            score, justification = eft_justification(kind)
            eft.append({"id": f"{task}-eft-{i}", "task": task, "instruction": p.question,
                        "response": _eft_response(kind, p, cfg, rng), "kind": kind, "score": score,
                        "justification": justification})
    return Suite(cfg, [], sft, eft, pool, test)
