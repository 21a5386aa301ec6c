"""The paper's datasets in their published HF schemas: fixtures written in exactly those schemas
(with a malformed row each), mapped into eval items / SFT chats / prompts, then evaluated."""

import json
import sys
import types

import datasets
import numpy as np
import pytest

from cream_jax import evaluate
from cream_jax.data import hf_datasets as hfd
from cream_jax.data import sources

# allenai/ai2_arc rows; row 1 uses ARC's numeric option labels, row 2 has five options, row 3 is malformed.
ARC = [
    {"id": "Mercury_7175875", "question": "Which gas do plants take in for photosynthesis?",
     "choices": {"text": ["oxygen", "carbon dioxide", "nitrogen", "helium"], "label": ["A", "B", "C", "D"]},
     "answerKey": "B"},
    {"id": "NYSEDREGENTS_2015_8_4", "question": "Which tool measures mass?",
     "choices": {"text": ["ruler", "thermometer", "balance", "graduated cylinder"], "label": ["1", "2", "3", "4"]},
     "answerKey": "3"},
    {"id": "MCAS_2004_5_9", "question": "Which is a mammal?",
     "choices": {"text": ["shark", "frog", "eagle", "snake", "whale"], "label": ["A", "B", "C", "D", "E"]},
     "answerKey": "E"},
    {"id": "Bad_1", "question": "Broken row?",
     "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "F"},
]
# allenai/openbookqa (main); row 2 is malformed (labels out of order).
OBQA = [
    {"id": "7-980", "question_stem": "The sun is responsible for",
     "choices": {"text": ["puppies learning new tricks", "plants sprouting, blooming and wilting",
                          "children growing up", "flowers wilting in a vase"], "label": ["A", "B", "C", "D"]},
     "answerKey": "B"},
    {"id": "7-584", "question_stem": "When standing miles away from Mount Rushmore",
     "choices": {"text": ["the mountains seem very close", "the mountains are boring",
                          "the mountains look the same as from up close", "the mountains seem smaller than in photographs"],
                 "label": ["A", "B", "C", "D"]},
     "answerKey": "D"},
    {"id": "bad", "question_stem": "Out of order",
     "choices": {"text": ["a", "b", "c", "d"], "label": ["B", "A", "C", "D"]}, "answerKey": "A"},
]
# allenai/social_i_qa; row 2 has a label outside 1..3.
SIQA = [
    {"context": "Tracy didn't go home that evening and resisted Riley's attacks.",
     "question": "What does Tracy need to do before this?",
     "answerA": "make a new plan", "answerB": "Go home and see Riley", "answerC": "Find somewhere to go", "label": "3"},
    {"context": "Sydney walked past a homeless woman asking for change but did not have any money.",
     "question": "How would you describe Sydney?",
     "answerA": "sympathetic", "answerB": "like a person who was unable to help", "answerC": "incredulous", "label": "1"},
    {"context": "Sasha protected the patients' rights.", "question": "What will patients want to do next?",
     "answerA": "write a letter", "answerB": "get petitions signed", "answerC": "live longer", "label": "4"},
]
# openai/gsm8k (main); row 1's final answer has a thousands comma, row 2 has no "####".
GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"},
    {"question": "A factory makes 617 toys a day for 2 days. How many toys is that?",
     "answer": "617 * 2 = <<617*2=1234>>1234\n#### 1,234"},
    {"question": "Broken?", "answer": "No final answer here."},
]


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        path.write_text(json.dumps(rows))
    return path


CASES = [  # task, fixture, file name, bad row index, expected problem
    ("arc_challenge", ARC, "arc.jsonl", 3, r"field 'answerKey' is 'F', not an option label \(A-B or 1-2\)"),
    ("openbookqa", OBQA, "obqa.parquet", 2, r"choices.label \['B', 'A', 'C', 'D'\] is not in order"),
    ("siqa", SIQA, "siqa.json", 2, r"field 'label' is '4', not an option label \(A-C or 1-3\)"),
    ("gsm8k", GSM8K, "gsm8k.jsonl", 2, r"field 'answer' has no '#### <final answer>'"),
]


@pytest.mark.parametrize("task,rows,name,bad,problem", CASES)
def test_malformed_row_raises_with_file_and_row_or_is_skipped(tmp_path, task, rows, name, bad, problem):
    path = write(tmp_path / name, rows)
    with pytest.raises(ValueError, match=f"{name}: row {bad}: {problem}") as info:
        hfd.load_benchmark(task, str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    loaded = hfd.load_benchmark(task, str(path), on_error="skip")
    assert loaded.n_skipped == 1 and len(loaded.items) == len(rows) - 1
    assert f"row {bad}:" in loaded.errors[0]
    assert all(x["task"] == task for x in loaded.items)


def test_arc_items_letters_and_options(tmp_path):
    items = hfd.load_benchmark("arc_easy", str(write(tmp_path / "arc.jsonl", ARC)), on_error="skip").items
    assert [x["id"] for x in items] == ["Mercury_7175875", "NYSEDREGENTS_2015_8_4", "MCAS_2004_5_9"]
    assert [x["label"] for x in items] == ["B", "C", "E"]  # "3" -> "C"
    assert items[1]["question"] == (
        "Which tool measures mass?\n(A) ruler\n(B) thermometer\n(C) balance\n(D) graduated cylinder"
    )
    for item, row in zip(items, ARC):
        assert evaluate.parse_options(item["question"]) == row["choices"]["text"]


def test_siqa_and_gsm8k_items(tmp_path):
    siqa = hfd.load_benchmark("siqa", str(write(tmp_path / "siqa.json", SIQA)), on_error="skip").items
    assert siqa[0] == {
        "id": "siqa-0",
        "question": "Tracy didn't go home that evening and resisted Riley's attacks.\nWhat does Tracy need to do "
                    "before this?\n(A) make a new plan\n(B) Go home and see Riley\n(C) Find somewhere to go",
        "label": "C",
        "task": "siqa",
    }
    gsm = hfd.load_benchmark("gsm8k", str(write(tmp_path / "g.jsonl", GSM8K)), on_error="skip").items
    assert [(x["id"], x["label"]) for x in gsm] == [("gsm8k-0", "72"), ("gsm8k-1", "1234")]
    assert gsm[0]["question"] == GSM8K[0]["question"]


def _first_line_router(answers):
    """A fake generate_fn: the canned response for each question, keyed by its first line."""
    calls = []

    def generate_fn(chats):
        calls.append(len(chats))
        return [answers[chat[-1]["content"].split("\n")[0]] for chat in chats]

    return generate_fn, calls


def test_evaluate_on_all_benchmarks(tmp_path):
    sets = {task: hfd.load_benchmark(task, str(write(tmp_path / name, rows)), on_error="skip").items
            for task, rows, name, _, _ in CASES}
    answers = {
        # arc: right, right (numeric label read as C), wrong
        "Which gas do plants take in for photosynthesis?": "Plants absorb CO2. The answer is (B).",
        "Which tool measures mass?": "A balance measures mass.\nAnswer: C",
        "Which is a mammal?": "The answer is (A)",
        # obqa: right, wrong
        "The sun is responsible for": "The answer is (B)",
        "When standing miles away from Mount Rushmore": "The answer is (C)",
        # siqa: wrong, right
        "Tracy didn't go home that evening and resisted Riley's attacks.": "The answer is (A)",
        "Sydney walked past a homeless woman asking for change but did not have any money.": "The answer is (A)",
        # gsm8k: right, right ("1,234" against the label from "#### 1,234")
        GSM8K[0]["question"]: "48 + 24 = 72. The answer is 72.",
        GSM8K[1]["question"]: "617 * 2 = 1234\n#### 1,234",
    }
    generate_fn, calls = _first_line_router(answers)
    acc = evaluate.evaluate(generate_fn, sets, batch_size=2)
    assert acc == {"arc_challenge": pytest.approx(2 / 3), "openbookqa": 0.5, "siqa": 0.5, "gsm8k": 1.0}
    # Chunks of at most batch_size, the last one of a set unpadded (the engine pads to its mesh bucket).
    assert max(calls) == 2 and sum(calls) == sum(len(v) for v in sets.values())


def test_evaluate_by_option_likelihood(tmp_path):
    """The options parsed back from the question are the published choices, in label order."""
    rows = ARC[:3]
    items = hfd.load_benchmark("arc_easy", str(write(tmp_path / "arc.jsonl", rows))).items
    gold = {r["question"]: r["choices"]["text"][ord(hfd._letter(r["answerKey"], "k", 5)) - ord("A")] for r in rows}
    gold["Which is a mammal?"] = "shark"  # one deliberate miss

    def score_fn(prompts, options):
        return [[float(o == gold[p[-1]["content"].split("\n")[0]]) for o in opts] for p, opts in zip(prompts, options)]

    acc = evaluate.evaluate(lambda chats: pytest.fail("no generation expected"), {"arc_easy": items}, 8, score_fn=score_fn)
    assert acc == {"arc_easy": pytest.approx(2 / 3)}


def test_dataset_folder_and_unreadable_file(tmp_path):
    folder = tmp_path / "arc_repo"
    folder.mkdir()
    write(folder / "test.jsonl", ARC[:2])
    write(folder / "train.jsonl", ARC[2:3])
    loaded = hfd.load_benchmark("arc_challenge", str(folder))
    assert [x["label"] for x in loaded.items] == ["B", "C"]
    assert [x["label"] for x in hfd.load_benchmark("arc_challenge", str(folder), split="train").items] == ["E"]

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ARC[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl: cannot be read by datasets \(.*row 1") as info:
        hfd.load_benchmark("arc_easy", str(broken))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"missing.parquet: no such file or folder"):
        hfd.load_benchmark("gsm8k", str(tmp_path / "missing.parquet"))
    with pytest.raises(ValueError, match=r"\.csv'? \(use .json, .jsonl or .parquet\)"):
        (tmp_path / "x.csv").write_text("a,b\n")
        hfd.load_benchmark("gsm8k", str(tmp_path / "x.csv"))


def test_hub_name_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # never wait for the network here
    with pytest.raises(ValueError) as info:
        hfd.load_benchmark("arc_easy")
    message = str(info.value)
    assert message.startswith("allenai/ai2_arc[ARC-Easy/test]: cannot load from the Hugging Face hub (")
    assert "offline" in message and "local .json/.jsonl/.parquet path" in message and "\n" not in message


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"load_benchmark: task must be one of .*'gsm8k'.*got 'mmlu'"):
        hfd.load_benchmark("mmlu", "x.jsonl")
    with pytest.raises(ValueError, match=r"on_error must be one of \('raise', 'skip'\), got 'ignore'"):
        hfd.eval_items("gsm8k", GSM8K, on_error="ignore")
    with pytest.raises(ValueError, match=r"backend must be one of \('datasets', 'tfds'\), got 'torch'"):
        hfd.load_rows("x", backend="torch")
    with pytest.raises(ValueError, match=r"rows: no valid eval records \(1 skipped\)"):
        hfd.eval_items("gsm8k", GSM8K[2:], on_error="skip")


# ------------------------------------------------------------------------------------------
# Open Assistant (oasst1 message trees).


def msg(mid, parent, role, text, lang="en", rank=None, **extra):
    row = {"message_id": mid, "parent_id": parent, "user_id": "u", "created_date": "2023-02-05T14:23:50.983374+00:00",
           "text": text, "role": role, "lang": lang, "review_count": 3, "review_result": True, "deleted": False,
           "rank": rank, "synthetic": False, "model_name": None, "message_tree_id": mid if parent is None else "t",
           "tree_state": "ready_for_export"}
    row.update(extra)
    return row


OASST = [
    msg("r1", None, "prompter", "What is a monad?"),
    msg("a1", "r1", "assistant", "A burrito.", rank=1),
    msg("a2", "r1", "assistant", "A monoid in the category of endofunctors.", rank=0),
    msg("a3", "r1", "assistant", "Deleted reply.", rank=None, deleted=True),
    msg("p2", "a2", "prompter", "Explain more."),  # a second turn: never a first-turn prompt
    msg("r2", None, "prompter", "Name a prime."),
    msg("b1", "r2", "assistant", "Seven."),  # the only reply, unranked
    msg("r3", None, "prompter", "Was ist ein Monad?", lang="de"),
    msg("c1", "r3", "assistant", "Ein Burrito.", lang="de", rank=0),
    msg("r4", None, "prompter", "Unanswered question?"),
    msg("r5", None, "prompter", "Rejected in review.", review_result=False),
    msg("e1", "r5", "assistant", "Reply to a rejected prompt.", rank=0),
    msg("x1", "r1", "user", "Malformed role."),
]
U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


def test_oasst_sft_and_prompts(tmp_path):
    path = write(tmp_path / "oasst1.jsonl", OASST)
    with pytest.raises(ValueError, match=r"oasst1.jsonl: row 12: field 'role' is 'user', expected one of \('prompter', 'assistant'\)"):
        hfd.load_oasst("sft", str(path))
    sft = hfd.load_oasst("sft", str(path), on_error="skip")
    assert sft.n_skipped == 1
    assert sft.items == [
        {"id": "r1", "messages": [U("What is a monad?"), A("A monoid in the category of endofunctors.")]},
        {"id": "r2", "messages": [U("Name a prime."), A("Seven.")]},
    ]
    prompts = hfd.load_oasst("prompts", str(path), on_error="skip").items
    assert prompts == [{"id": r, "messages": [U(t)]} for r, t in
                       [("r1", "What is a monad?"), ("r2", "Name a prime."), ("r4", "Unanswered question?")]]
    every_lang = hfd.oasst_items("sft", OASST[:-1], lang=None).items
    assert [x["id"] for x in every_lang] == ["r1", "r2", "r3"]


def test_oasst_malformed_rows():
    with pytest.raises(ValueError, match=r"rows: row 1: duplicate message_id 'r1'"):
        hfd.oasst_items("prompts", [OASST[0], OASST[0]])
    with pytest.raises(ValueError, match=r"rows: row 0: field 'rank' must be a number or null, got 'best'"):
        hfd.oasst_items("sft", [msg("r1", None, "prompter", "q", rank="best")])
    with pytest.raises(ValueError, match=r"rows: row 0: messages\[0\] \(user\) has empty content"):
        hfd.oasst_items("prompts", [msg("r1", None, "prompter", "   ")])
    with pytest.raises(ValueError, match=r"rows: row 0: missing field 'message_id'"):
        hfd.oasst_items("prompts", [{"role": "prompter", "text": "q"}])


# ------------------------------------------------------------------------------------------
# Export CLI and prompt pools: the files round-trip through the trainer's loaders.


def test_export_cli_round_trips_through_sources(tmp_path, capsys):
    arc = write(tmp_path / "arc.jsonl", ARC)
    out = tmp_path / "out" / "arc_c.json"
    assert hfd.main(["arc_challenge", "--source", str(arc), "--out", str(out), "--on_error", "skip"]) == 0
    assert "3 records (1 rows skipped)" in capsys.readouterr().out
    expected = hfd.load_benchmark("arc_challenge", str(arc), on_error="skip").items
    assert sources.load_eval_set(out).items == expected

    pool = tmp_path / "pool.jsonl"
    assert hfd.main(["arc_challenge", "--source", str(arc), "--out", str(pool), "--on_error", "skip", "--as_prompts"]) == 0
    items = sources.load_prompt_pool(pool).items
    assert items[1] == {"id": "NYSEDREGENTS_2015_8_4", "messages": [U(expected[1]["question"])],
                        "task": "arc_challenge", "answer": "C"}

    oasst = write(tmp_path / "oasst1.parquet", OASST[:-1])
    sft = tmp_path / "sft.jsonl"
    assert hfd.main(["oasst_sft", "--source", str(oasst), "--out", str(sft)]) == 0
    assert [x["id"] for x in sources.load_sft_chats(sft).items] == ["r1", "r2"]

    assert hfd.main(["gsm8k", "--source", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "g.json")]) == 2
    assert "error: " in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# tensorflow-datasets path (the real package is an optional extra, not installed here).


def test_tfds_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as when not installed
    with pytest.raises(ValueError, match=r"^backend='tfds' needs tensorflow-datasets: pip install cream_jax\[tfds\]$"):
        hfd.load_benchmark("arc_easy", backend="tfds")
    with pytest.raises(ValueError, match=r"oasst_sft: no tensorflow-datasets version is known"):
        hfd._read_spec("oasst_sft", None, None, None, "tfds")


def test_tfds_rows_are_mapped(monkeypatch):
    """Rows as tfds.as_numpy yields them for the builders' features (bytes, ClassLabel indices)."""
    tfds_rows = {
        ("ai2_arc/ARC-Easy", "test"): [
            {"id": b"Mercury_1", "question": b"Which gas do plants take in?",
             "choices": {"text": np.array([b"oxygen", b"carbon dioxide", b"helium"], dtype=object),
                         "label": np.array([0, 1, 2])},
             "answerKey": np.int64(1)},
        ],
        ("openbookqa", "test"): [
            {"question": {"stem": b"The sun is responsible for", "choice_A": b"puppies", "choice_B": b"plants wilting",
                          "choice_C": b"children", "choice_D": b"vases"},
             "fact1": b"the sun is the source of energy", "humanScore": np.float32(1.0), "clarity": np.float32(2.0),
             "turkIdAnonymized": b"b356d338b7", "answerKey": np.int64(1)},
        ],
    }
    calls = []

    def load(name, split):
        calls.append((name, split))
        return tfds_rows[(name, split)]

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.SimpleNamespace(load=load, as_numpy=iter))
    arc = hfd.load_benchmark("arc_easy", backend="tfds").items
    assert arc == [{"id": "Mercury_1", "question": "Which gas do plants take in?\n(A) oxygen\n(B) carbon dioxide\n(C) helium",
                    "label": "B", "task": "arc_easy"}]
    obqa = hfd.load_benchmark("openbookqa", backend="tfds").items
    assert obqa[0]["id"] == "openbookqa-0" and obqa[0]["label"] == "B"
    assert evaluate.parse_options(obqa[0]["question"]) == ["puppies", "plants wilting", "children", "vases"]
    assert calls == [("ai2_arc/ARC-Easy", "test"), ("openbookqa", "test")]
