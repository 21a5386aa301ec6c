"""Data loaders: accepted schemas, and one-line errors naming the file, the record and the problem."""

import json

import pytest

from cream_jax.data.sources import (
    load_eval_set,
    load_pairs,
    load_prompt_pool,
    load_sft_chats,
    parse_records,
    read_records,
)

U = {"role": "user", "content": "How many?"}
A = {"role": "assistant", "content": "The answer is 3."}


def write(tmp_path, name, data):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in data) + "\n")
    elif name.endswith(".parquet"):
        import datasets

        datasets.Dataset.from_list(data).to_parquet(str(path))
    else:
        path.write_text(json.dumps(data))
    return path


def test_sft_cream_dict_and_rows(tmp_path):
    loaded = load_sft_chats(write(tmp_path, "sft.json", {"u1": [U, A], "u2": [{"role": "system", "content": "s"}, U, A]}))
    assert loaded.n_skipped == 0 and [x["id"] for x in loaded.items] == ["u1", "u2"]
    assert loaded.items[0]["messages"] == [U, A]
    rows = [{"messages": [U, A], "task": "arith"}, {"id": 7, "prompt": "Hi?", "completion": "Hello."}]
    items = load_sft_chats(write(tmp_path, "sft.jsonl", rows)).items
    assert items[0] == {"id": "sft-0", "messages": [U, A], "task": "arith"}
    assert items[1] == {"id": "7", "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


@pytest.mark.parametrize(
    "record,message",
    [
        ([U], r"key 'bad': field 'messages' must end with role 'assistant', ends with 'user'"),
        ([U, {"role": "assistant", "content": "  "}], r"key 'bad': messages\[1\] \(assistant\) has empty content"),
        ([U, {"role": "assistant", "content": 3}], r"key 'bad': messages\[1\] content must be a string, got int"),
        ([U, {"role": "bot", "content": "x"}], r"key 'bad': messages\[1\] has role 'bot'"),
        ([U, {"content": "x"}], r"key 'bad': messages\[1\] is missing 'role'"),
        ([A, U], r"key 'bad': field 'messages' roles \['assistant', 'user'\] must be"),
        ([], r"key 'bad': field 'messages' must be a non-empty list"),
        ("text", r"key 'bad': record must be a dict, got str"),
    ],
)
def test_sft_errors_name_file_record_and_problem(tmp_path, record, message):
    path = write(tmp_path, "sft.json", {"good": [U, A], "bad": record})
    with pytest.raises(ValueError, match=f"sft.json: {message}") as info:
        load_sft_chats(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    loaded = load_sft_chats(path, on_error="skip")
    assert [x["id"] for x in loaded.items] == ["good"] and loaded.n_skipped == 1 and len(loaded.errors) == 1


def test_file_level_errors(tmp_path):
    with pytest.raises(ValueError, match="missing.json: no such file"):
        load_sft_chats(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: invalid JSON"):
        load_sft_chats(bad)
    with pytest.raises(ValueError, match=r"data.csv: unsupported extension '.csv'"):
        (tmp_path / "data.csv").write_text("a,b")
        load_sft_chats(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="top level must be a dict or a list, got int"):
        load_sft_chats(write(tmp_path, "num.json", 3))
    with pytest.raises(ValueError, match=r"all_bad.json: no valid sft records \(2 skipped\)"):
        load_sft_chats(write(tmp_path, "all_bad.json", [[U], [A]]), on_error="skip")
    with pytest.raises(ValueError, match="on_error must be one of"):
        load_sft_chats(write(tmp_path, "ok.json", [[U, A]]), on_error="ignore")


def test_jsonl_bad_line_and_duplicate_ids(tmp_path):
    path = write(tmp_path, "p.jsonl", [{"id": "a", "prompt": "x"}, "{oops", {"id": "a", "prompt": "y"}, {"prompt": ""}])
    with pytest.raises(ValueError, match=r"p.jsonl: line 2: invalid JSON"):
        load_prompt_pool(path)
    loaded = load_prompt_pool(path, on_error="skip")
    assert loaded.n_skipped == 3 and [x["id"] for x in loaded.items] == ["a"]
    assert "line 3: duplicate id 'a'" in loaded.errors[1]
    assert "line 4: field 'prompt' is empty" in loaded.errors[2]


def test_prompt_pools(tmp_path):
    items = load_prompt_pool(write(tmp_path, "prompt.1.json", {"u1": [U]})).items
    assert items == [{"id": "u1", "messages": [U]}]
    rows = [{"uuid": "x", "prompt": "Q?", "task": "arith", "answer": 4}, {"messages": [U]}, {"prompt": [U]}]
    items = load_prompt_pool(write(tmp_path, "pool.jsonl", rows)).items
    assert items[0] == {"id": "x", "messages": [{"role": "user", "content": "Q?"}], "task": "arith", "answer": "4"}
    assert items[1]["messages"] == [U] and items[2]["messages"] == [U]
    with pytest.raises(ValueError, match=r"key 'u1': field 'messages' must end with role 'user'"):
        load_prompt_pool(write(tmp_path, "bad.json", {"u1": [U, A]}))
    with pytest.raises(ValueError, match=r"row 0: missing field 'prompt' \(or 'messages'\)"):
        load_prompt_pool(write(tmp_path, "bad2.json", [{"text": "x"}]))
    with pytest.raises(ValueError, match=r"row 0: field 'answer' must be a string or a number, got list"):
        load_prompt_pool(write(tmp_path, "bad3.json", [{"prompt": "x", "answer": [1]}]))


def test_eval_sets(tmp_path):
    rows = [{"uuid": "g1", "question": "2+2?", "label": 4, "task": "gsm8k"}, {"id": "a1", "question": "Q? (A) x (B) y", "label": "B"}]
    loaded = load_eval_set(write(tmp_path, "test.json", rows), task="arc_easy")
    assert loaded.items == [
        {"id": "g1", "question": "2+2?", "label": "4", "task": "gsm8k"},
        {"id": "a1", "question": "Q? (A) x (B) y", "label": "B", "task": "arc_easy"},
    ]
    path = write(tmp_path, "t.jsonl", [{"id": "a", "question": "q", "label": "A"}])
    with pytest.raises(ValueError, match=r"t.jsonl: line 1: missing field 'task' \(or pass task=...\)"):
        load_eval_set(path)
    for record, message in [
        ({"question": "q", "task": "x"}, "row 0: missing field 'label'"),
        ({"question": "q", "label": True, "task": "x"}, "row 0: field 'label' must be a non-empty string or an integer"),
        ({"question": " ", "label": "A", "task": "x"}, "row 0: field 'question' is empty"),
        ({"label": "A", "task": "x"}, "row 0: missing field 'question'"),
        ({"id": 1.5, "question": "q", "label": "A", "task": "x"}, "row 0: field 'id' must be a string or an integer, got float"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_eval_set(write(tmp_path, "e.json", [record]))


def test_pairs_json_jsonl_parquet_and_cream_dpo(tmp_path):
    rows = [
        {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
        {"id": "c", "prompt": [U], "chosen": [U, {"role": "assistant", "content": "g"}], "rejected": [{"role": "assistant", "content": "b"}]},
    ]
    expect = [
        {"id": "pairs-0", "prompt": [{"role": "user", "content": "Q?"}], "chosen": "good", "rejected": "bad"},
        {"id": "c", "prompt": [U], "chosen": "g", "rejected": "b"},
    ]
    assert load_pairs(write(tmp_path, "pairs.json", rows)).items == expect
    assert load_pairs(write(tmp_path, "pairs.jsonl", rows)).items == expect
    flat = [{"prompt": "Q?", "chosen": "good", "rejected": "bad"}, {"prompt": "P?", "chosen": "g", "rejected": "b"}]
    items = load_pairs(write(tmp_path, "pairs.parquet", flat)).items
    assert [(x["id"], x["chosen"]) for x in items] == [("pairs-0", "good"), ("pairs-1", "g")]
    cream = {"u1": {"prompt": [U], "selected": [U, A], "rejected": [U, {"role": "assistant", "content": "no"}], "consistency": 0.75},
             "u2": {"prompt": [U], "selected": [U, A], "rejected": [U, A], "consistency": None}}
    items = load_pairs(write(tmp_path, "dpo.json", cream)).items
    assert items[0] == {"id": "u1", "prompt": [U], "chosen": A["content"], "rejected": "no", "consistency": 0.75}
    assert "consistency" not in items[1]
    for record, message in [
        ({"prompt": "q", "chosen": "a"}, "row 0: missing field 'rejected'"),
        ({"chosen": "a", "rejected": "b"}, "row 0: missing field 'prompt'"),
        ({"prompt": "q", "rejected": "b"}, "row 0: missing field 'chosen'"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "row 0: field 'chosen' is empty"),
        ({"prompt": "q", "chosen": 5, "rejected": "b"}, "row 0: field 'chosen' must be a string or messages"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "consistency": 2}, "row 0: field 'consistency' must be a number in"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_pairs(write(tmp_path, "bad.json", [record]))


def test_parse_records_takes_dataset_rows():
    rows = [{"question": "q", "label": "A"}, {"question": "r"}]
    loaded = parse_records("eval", ((f"row {i}", None, r) for i, r in enumerate(rows)), source="hub/arc",
                           task="arc_easy", on_error="skip")
    assert loaded.items == [{"id": "arc-0", "question": "q", "label": "A", "task": "arc_easy"}]
    assert loaded.errors == ["hub/arc: row 1: missing field 'label'"]
    with pytest.raises(ValueError, match="kind must be one of"):
        parse_records("chats", [])


def test_read_records_reports_where(tmp_path):
    assert read_records(write(tmp_path, "d.json", {"k": 1})) == [("key 'k'", "k", 1)]
    assert read_records(write(tmp_path, "l.jsonl", [{"a": 1}])) == [("line 1", None, {"a": 1})]
