"""The embedded default task suite: seeded, verifiable tasks shaped like the paper's evaluations.

Two tasks (docs/embedded_suite.md has examples and the mapping to the paper's benchmarks):

* ``"arith"`` (GSM8K-like): a short word problem with 1..k operations; the solution shows one
  worked step per operation and ends "The answer is N." ::

    Ann has 3 apples. She gets 4 more. How many apples does Ann have now?
    -> 3 + 4 = 7. The answer is 7.

* ``"choice"`` (ARC / OpenBookQA / SIQA-like): a context of facts, a question, lettered options ::

    Context: Ann wears red. Bob wears blue. Cid wears green. Question: Who wears blue? (A) Cid (B) Bob (C) Ann
    -> Bob wears blue. The answer is (B).

`make_suite` draws, per task, one stream of distinct questions from a numpy Generator seeded by
``(seed, task index)`` and cuts it into splits in a fixed order -- test, prompt pool, SFT, EFT,
pretraining -- so the splits are disjoint by construction and the test set depends only on the
seed, the task knobs and ``num_test`` (not on the sizes of the other splits).

Nothing here depends on a tokenizer or a model: chat items are message lists, rendered by the
model's own chat template in `cream_jax.data.pipeline`. Shape letters: B prompts, R responses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from cream_jax.evaluate import is_correct, task_kind

TASKS = ("arith", "choice")
ARITH_OPS = ("add", "sub", "mul")
DISTRACTOR_STYLES = ("context", "outside")
RELATIONS = ("color", "pet", "city", "food")
QUESTION_TYPES = ("who", "what")
EFT_KINDS = ("correct", "no_steps", "wrong_final", "wrong", "malformed", "off_topic")

# Names are three letters so every name is one or two tokens; each has a pronoun.
NAMES = (
    ("Ann", "She"), ("Bob", "He"), ("Cid", "He"), ("Dan", "He"), ("Eve", "She"), ("Fay", "She"),
    ("Gus", "He"), ("Hal", "He"), ("Ivy", "She"), ("Jon", "He"), ("Kim", "She"), ("Lea", "She"),
    ("Max", "He"), ("Ned", "He"), ("Oli", "He"), ("Pam", "She"), ("Ray", "He"), ("Sue", "She"),
    ("Tom", "He"), ("Uma", "She"),
)
OBJECTS = ("apples", "pens", "books", "cards", "eggs", "coins", "shells", "balls", "cups", "stamps")
ARITH_STARTS = ("{name} has {n} {obj}.", "There are {n} {obj} in the bag of {name}.")
ARITH_PHRASES = {
    "add": ("{P} gets {k} more.", "{P} finds {k} more.", "{P} buys {k} more."),
    "sub": ("{P} gives away {k}.", "{P} loses {k}.", "{P} sells {k}."),
    "mul": ("{P} makes them {k} times as many.",),
}
ARITH_SYMBOLS = {"add": "+", "sub": "-", "mul": "*"}
ARITH_QUESTION = "How many {obj} does {name} have now?"
# relation -> (fact, "who" question, "what" question, values)
RELATION_TEMPLATES = {
    "color": ("{name} wears {v}.", "Who wears {v}?", "What does {name} wear?",
              ("red", "blue", "green", "pink", "gray", "black", "white", "brown")),
    "pet": ("{name} has a {v}.", "Who has a {v}?", "What pet does {name} have?",
            ("cat", "dog", "fish", "bird", "frog", "duck", "goat", "horse")),
    "city": ("{name} lives in {v}.", "Who lives in {v}?", "Where does {name} live?",
             ("Rome", "Oslo", "Lima", "Cairo", "Paris", "Tokyo", "Delhi", "Quito")),
    "food": ("{name} eats {v}.", "Who eats {v}?", "What does {name} eat?",
             ("rice", "bread", "soup", "cake", "pasta", "beans", "corn", "plums")),
}
LETTERS = "ABCDE"


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    """Knobs of the embedded suite. Sizes are per task.

    Attributes:
      seed: seed of every random choice.
      tasks: subset of TASKS.
      arith_min_ops, arith_max_ops: number of operations per arith problem (uniform in range).
      arith_max_operand: add/sub operands are drawn from 1..this, the start amount from 2..this.
      arith_max_value: cap on every intermediate and final value (9 keeps all numbers one digit).
      arith_ops: allowed operations, subset of ARITH_OPS ("mul" multiplies by 2..3).
      choice_num_facts: people (facts) in a choice context.
      choice_num_options: options per choice question, 3..5.
      choice_distractors: "context" (wrong options are other people/values of the context: the
        context must be read) or "outside" (wrong options never occur in the context: easier).
      choice_relations: subset of RELATIONS used for facts.
      choice_question_types: "who" (options are names) and/or "what" (options are values).
      num_pretrain: problem+solution texts in the pretraining corpus.
      pretrain_chat_fraction: share of pretraining items given as chats (user/assistant) rather
        than as plain "question\\nsolution" text.
      num_sft: labeled (question, solution) chats for SFT.
      num_eft: judge-training (EFT) examples.
      num_iterations: number T of per-iteration prompt subsets.
      pool_per_iteration: unlabeled prompts per iteration.
      num_test: held-out test questions.
    """

    seed: int = 0
    tasks: tuple[str, ...] = TASKS
    arith_min_ops: int = 1
    arith_max_ops: int = 2
    arith_max_operand: int = 9
    arith_max_value: int = 9
    arith_ops: tuple[str, ...] = ("add", "sub")
    choice_num_facts: int = 3
    choice_num_options: int = 3
    choice_distractors: str = "context"
    choice_relations: tuple[str, ...] = RELATIONS
    choice_question_types: tuple[str, ...] = QUESTION_TYPES
    num_pretrain: int = 8000
    pretrain_chat_fraction: float = 0.5
    num_sft: int = 256
    num_eft: int = 120
    num_iterations: int = 3
    pool_per_iteration: int = 128
    num_test: int = 200

    def __post_init__(self):
        def need(ok: bool, field: str, what: str):
            if not ok:
                raise ValueError(f"SuiteConfig.{field}: {what}, got {getattr(self, field)!r}")

        need(len(self.tasks) > 0 and set(self.tasks) <= set(TASKS), "tasks", f"must be a non-empty subset of {TASKS}")
        need(1 <= self.arith_min_ops <= self.arith_max_ops, "arith_min_ops", "must be in 1..arith_max_ops")
        need(self.arith_max_operand >= 2, "arith_max_operand", "must be >= 2")
        need(self.arith_max_value >= 2, "arith_max_value", "must be >= 2")
        need(len(self.arith_ops) > 0 and set(self.arith_ops) <= set(ARITH_OPS), "arith_ops",
             f"must be a non-empty subset of {ARITH_OPS}")
        need(self.choice_num_facts >= 2, "choice_num_facts", "must be >= 2")
        need(3 <= self.choice_num_options <= 5, "choice_num_options", "must be in 3..5")
        need(self.choice_distractors in DISTRACTOR_STYLES, "choice_distractors", f"must be one of {DISTRACTOR_STYLES}")
        need(len(self.choice_relations) > 0 and set(self.choice_relations) <= set(RELATIONS), "choice_relations",
             f"must be a non-empty subset of {RELATIONS}")
        need(len(self.choice_question_types) > 0 and set(self.choice_question_types) <= set(QUESTION_TYPES),
             "choice_question_types", f"must be a non-empty subset of {QUESTION_TYPES}")
        # Every value/name must be distinct within a question: context facts plus outside distractors.
        pool_needed = self.choice_num_facts + (self.choice_num_options - 1 if self.choice_distractors == "outside" else
                                               max(0, self.choice_num_options - self.choice_num_facts))
        need(pool_needed <= 8, "choice_num_facts", "facts plus outside distractors must fit 8 values per relation")
        need(0.0 <= self.pretrain_chat_fraction <= 1.0, "pretrain_chat_fraction", "must be in [0, 1]")
        for field in ("num_pretrain", "num_sft", "num_eft", "pool_per_iteration", "num_test"):
            need(getattr(self, field) >= 0, field, "must be >= 0")
        need(self.num_iterations >= 1, "num_iterations", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One generated question with its worked solution and gold label."""

    task: str
    question: str
    steps: tuple[str, ...]  # worked-step sentences, each ending with "."
    label: str  # "7" for arith, "B" for choice
    claims: tuple[str, ...] = ()  # choice: per option, the fact sentence that would make it right

    @property
    def solution(self) -> str:
        return " ".join(self.steps + (final_sentence(self.task, self.label),))


@dataclasses.dataclass(frozen=True)
class Suite:
    """Everything the embedded default run needs, as plain Python data.

    Attributes:
      config: the knobs it was made from.
      pretrain: corpus items, each {"text": str} (plain problem + solution) or {"messages": [user,
        assistant]} (rendered with the model's chat template by the pipeline).
      sft: labeled seed chats {"id", "task", "messages": [user, assistant]}.
      eft: judge-training examples {"id", "task", "instruction", "response", "kind", "score"
        (0..5, oracle), "justification" (ends "Score: k")}; render with the judge prompt elsewhere.
      pool: ``num_iterations`` prompt subsets, items {"id", "task", "messages": [user], "answer"}
        ("answer" is hidden from the model, for the oracle only).
      test: {task: [{"id", "question", "label", "task"}]}.
    """

    config: SuiteConfig
    pretrain: list[dict]
    sft: list[dict]
    eft: list[dict]
    pool: list[list[dict]]
    test: dict[str, list[dict]]


def final_sentence(task: str, label: str) -> str:
    """The closing sentence of a solution: "The answer is 7." / "The answer is (B)."."""
    return f"The answer is ({label})." if task_kind(task) == "choice" else f"The answer is {label}."


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _arith_problem(cfg: SuiteConfig, rng: np.random.Generator) -> Problem:
    cap = cfg.arith_max_value
    n_ops = int(rng.integers(cfg.arith_min_ops, cfg.arith_max_ops + 1))
    # Rejection sampling: a draw that reaches a value where no allowed operation fits is redrawn,
    # so every problem has exactly n_ops operations and all values stay in 0..cap.
    for _ in range(100):
        name, pron = _pick(rng, NAMES)
        obj = _pick(rng, OBJECTS)
        value = int(rng.integers(2, min(cfg.arith_max_operand, cap) + 1))
        sentences = [_pick(rng, ARITH_STARTS).format(name=name, n=value, obj=obj)]
        steps = []
        for _ in range(n_ops):
            ranges = {
                "add": (1, min(cfg.arith_max_operand, cap - value)),
                "sub": (1, min(cfg.arith_max_operand, value)),
                "mul": (2, min(3, cap // max(value, 1))),
            }
            feasible = [op for op in cfg.arith_ops if ranges[op][0] <= ranges[op][1]]
            if not feasible:
                break
            op = _pick(rng, feasible)
            k = int(rng.integers(ranges[op][0], ranges[op][1] + 1))
            new = {"add": value + k, "sub": value - k, "mul": value * k}[op]
            sentences.append(_pick(rng, ARITH_PHRASES[op]).format(P=pron, k=k))
            steps.append(f"{value} {ARITH_SYMBOLS[op]} {k} = {new}.")
            value = new
        if len(steps) == n_ops:
            sentences.append(ARITH_QUESTION.format(obj=obj, name=name))
            return Problem("arith", " ".join(sentences), tuple(steps), str(value))
    raise ValueError(f"SuiteConfig: {n_ops} operations of {cfg.arith_ops} rarely fit arith_max_value={cap}")


def _choice_problem(cfg: SuiteConfig, rng: np.random.Generator) -> Problem:
    relation = _pick(rng, cfg.choice_relations)
    fact, who_q, what_q, values = RELATION_TEMPLATES[relation]
    qtype = _pick(rng, cfg.choice_question_types)
    n_facts, n_opt = cfg.choice_num_facts, cfg.choice_num_options
    n_outside = n_opt - 1 if cfg.choice_distractors == "outside" else max(0, n_opt - n_facts)
    names = [NAMES[i][0] for i in rng.permutation(len(NAMES))[: n_facts + n_outside]]
    vals = [values[i] for i in rng.permutation(len(values))[: n_facts + n_outside]]
    people, outside_names = names[:n_facts], names[n_facts:]
    held, outside_vals = vals[:n_facts], vals[n_facts:]
    context = " ".join(fact.format(name=n, v=v) for n, v in zip(people, held))
    target = int(rng.integers(n_facts))
    if qtype == "who":
        question, answer, in_context, outside = who_q.format(v=held[target]), people[target], people, outside_names
    else:
        question, answer, in_context, outside = what_q.format(name=people[target]), held[target], held, outside_vals
    others = [x for x in in_context if x != answer] if cfg.choice_distractors == "context" else []
    others = [others[i] for i in rng.permutation(len(others))][: n_opt - 1]
    options = [answer] + others + list(outside[: n_opt - 1 - len(others)])
    options = [options[i] for i in rng.permutation(n_opt)]
    label = LETTERS[options.index(answer)]
    listed = " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
    text = f"Context: {context} Question: {question} {listed}"
    if qtype == "who":
        claims = tuple(fact.format(name=o, v=held[target]) for o in options)
    else:
        claims = tuple(fact.format(name=people[target], v=o) for o in options)
    return Problem("choice", text, (claims[options.index(answer)],), label, claims)


_GENERATORS = {"arith": _arith_problem, "choice": _choice_problem}


def _wrong_number(rng: np.random.Generator, value: int) -> int:
    return value + int(_pick(rng, [d for d in (-2, -1, 1, 2) if value + d >= 0]))


def _apply(sym: str, a: int, k: int) -> int:
    return {"+": a + k, "-": a - k, "*": a * k}[sym]


def _eft_response(kind: str, p: Problem, cfg: SuiteConfig, rng: np.random.Generator) -> str:
    """A candidate response of the given kind (its oracle score is in `_EFT_POINTS`)."""
    if kind == "correct":
        return p.solution
    if kind == "no_steps":
        return final_sentence(p.task, p.label)
    if kind == "off_topic":
        # The solution of a fresh question with a different label (never shown as a question).
        for _ in range(1000):
            other = _GENERATORS[p.task](cfg, rng)
            if other.label != p.label:
                return other.solution
        raise ValueError(f"SuiteConfig: the {p.task!r} knobs leave a single possible answer")
    if kind == "malformed":
        # Cut inside the first step: no finished step, no final answer.
        words = p.steps[0].split(" ")
        return " ".join(words[: max(1, len(words) - 2)])
    if p.task == "arith":
        if kind == "wrong_final":
            return " ".join(p.steps + (final_sentence("arith", str(_wrong_number(rng, int(p.label)))),))
        # "wrong": an error in the first step, carried on consistently to the final answer.
        steps, value = [], None
        for i, step in enumerate(p.steps):
            a, sym, k, _, _ = step[:-1].split(" ")
            a = int(a) if i == 0 else value
            value = _apply(sym, a, int(k))
            value = _wrong_number(rng, value) if i == 0 else value
            steps.append(f"{a} {sym} {k} = {value}.")
        return " ".join(steps + [final_sentence("arith", str(value))])
    wrong = int(_pick(rng, [i for i in range(len(p.claims)) if LETTERS[i] != p.label]))
    if kind == "wrong_final":
        return " ".join(p.steps + (final_sentence("choice", LETTERS[wrong]),))
    # "wrong": a false fact that points at a distractor, and that distractor's letter.
    return f"{p.claims[wrong]} {final_sentence('choice', LETTERS[wrong])}"


# Additive oracle rubric (mirrors the 5-point additive judge): addresses the question +1, shows a
# correct worked step +1, ends with the required final-answer sentence +1, final answer correct +2.
_EFT_POINTS = {
    "correct": (1, 1, 1, 2),
    "no_steps": (1, 0, 1, 2),
    "wrong_final": (1, 1, 1, 0),
    "wrong": (1, 0, 1, 0),
    "malformed": (1, 0, 0, 0),
    "off_topic": (0, 0, 1, 0),
}
_EFT_STEP_TEXT = {
    "correct": "shows a correct step", "no_steps": "shows no step", "wrong_final": "shows a correct step",
    "wrong": "shows a wrong step", "malformed": "stops before finishing its step", "off_topic": "solves another question",
}


def eft_justification(kind: str) -> tuple[int, str]:
    """Oracle score (0..5) and a short justification ending "Score: k" for a candidate kind."""
    addresses, _, formatted, right = _EFT_POINTS[kind]
    score = sum(_EFT_POINTS[kind])
    text = (
        f"The response {'addresses' if addresses else 'does not address'} the question and {_EFT_STEP_TEXT[kind]}. "
        f"It {'ends with' if formatted else 'lacks'} a final answer"
        + ("." if not formatted else f", which is {'correct' if right else 'wrong'}.")
        + f" Score: {score}"
    )
    return score, text


def _distinct_problems(task: str, cfg: SuiteConfig, rng: np.random.Generator, count: int) -> list[Problem]:
    seen: set[str] = set()
    out: list[Problem] = []
    misses = 0  # consecutive duplicates: many in a row means the knobs allow few questions
    while len(out) < count:
        p = _GENERATORS[task](cfg, rng)
        if p.question in seen:
            misses += 1
            if misses > 2000:
                raise ValueError(
                    f"SuiteConfig: cannot draw {count} distinct {task!r} questions with these knobs "
                    f"(got {len(out)}); widen them or lower the split sizes"
                )
            continue
        misses = 0
        seen.add(p.question)
        out.append(p)
    return out


def _chat(question: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def make_suite(cfg: SuiteConfig = SuiteConfig()) -> Suite:
    """Generates the suite deterministically from ``cfg`` (same config -> identical suite).

    Args:
      cfg: knobs and seed.

    Returns:
      A `Suite`; split sizes per task are ``cfg.num_*`` (pool: ``num_iterations`` subsets of
      ``pool_per_iteration`` per task), all questions distinct across splits.
    """
    pretrain, sft, eft, test = [], [], [], {}
    pool: list[list[dict]] = [[] for _ in range(cfg.num_iterations)]
    for task in cfg.tasks:
        rng = np.random.default_rng([cfg.seed, TASKS.index(task)])
        n_pool = cfg.num_iterations * cfg.pool_per_iteration
        sizes = (cfg.num_test, n_pool, cfg.num_sft, cfg.num_eft, cfg.num_pretrain)
        problems = _distinct_problems(task, cfg, rng, sum(sizes))
        cuts = np.cumsum((0,) + sizes)
        test_p, pool_p, sft_p, eft_p, pre_p = (problems[a:b] for a, b in zip(cuts[:-1], cuts[1:]))

        test[task] = [{"id": f"{task}-test-{i}", "question": p.question, "label": p.label, "task": task}
                      for i, p in enumerate(test_p)]
        for i, p in enumerate(pool_p):
            pool[i // cfg.pool_per_iteration].append(
                {"id": f"{task}-pool-{i}", "task": task, "messages": _chat(p.question), "answer": p.label})
        sft += [{"id": f"{task}-sft-{i}", "task": task, "messages": _chat(p.question, p.solution)}
                for i, p in enumerate(sft_p)]
        kinds = [EFT_KINDS[i % len(EFT_KINDS)] for i in rng.permutation(len(eft_p))]
        for i, (p, kind) in enumerate(zip(eft_p, kinds)):
            response = _eft_response(kind, p, cfg, rng)
            score, justification = eft_justification(kind)
            eft.append({"id": f"{task}-eft-{i}", "task": task, "instruction": p.question, "response": response,
                        "kind": kind, "score": score, "justification": justification})
        for p in pre_p:
            if rng.random() < cfg.pretrain_chat_fraction:
                pretrain.append({"messages": _chat(p.question, p.solution)})
            else:
                pretrain.append({"text": f"{p.question}\n{p.solution}"})
    # Interleave the tasks in the corpus with a generator of its own (task streams stay untouched).
    order = np.random.default_rng([cfg.seed, len(TASKS)]).permutation(len(pretrain))
    return Suite(cfg, [pretrain[i] for i in order], sft, eft, pool, test)


def verify(task: str, answer_label: str, response_text: str) -> float:
    """Oracle: 1.0 if the final answer extracted from the response (default extractor) is right."""
    return float(is_correct(response_text, answer_label, task_kind(task)))


def oracle_reward(tasks: Sequence[str], labels: Sequence[str], responses: Sequence[Sequence[str]]) -> np.ndarray:
    """Oracle rewards of sampled responses.

    Args:
      tasks: B task names.
      labels: B gold labels.
      responses: B lists of R response texts.

    Returns:
      rewards [B, R] float32 in {0, 1}.
    """
    if not (len(tasks) == len(labels) == len(responses)):
        raise ValueError(f"oracle_reward: {len(tasks)} tasks, {len(labels)} labels, {len(responses)} response lists")
    widths = {len(r) for r in responses}
    if len(widths) > 1:
        raise ValueError(f"oracle_reward: response lists have different lengths {sorted(widths)}")
    return np.asarray(
        [[verify(t, y, r) for r in rs] for t, y, rs in zip(tasks, labels, responses)], dtype=np.float32
    ).reshape(len(tasks), widths.pop() if widths else 0)
