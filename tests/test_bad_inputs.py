"""A battery of bad inputs: each is refused with one line ``error: <what>: <why>`` naming the field
or file, its class's exit code, no traceback, and nothing already in the workdir changed.

Most cases run the CLI entry in-process (``train.main(argv)``): they fail in validation, before any
training. The interruption and failed-write cases need a process of their own.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cream_jax import config as config_lib, errors, validate
from cream_jax.data import tokenizer as tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "tests" / "configs" / "smoke.gin")

CONFIG, DIVERGENCE, DATA, MODEL, CHECKPOINT, FILESYSTEM, INTERRUPTED = 2, 3, 4, 5, 6, 7, 130


# ---------------------------------------------------------------------------------------------
# Helpers.


def tree_digest(path: Path) -> str:
    """Hash of every name and file content under ``path`` ("absent" if it does not exist)."""
    if not path.exists():
        return "absent"
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def workdir(tmp_path):
    """A workdir holding something already written, which a refused run must leave untouched."""
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "notes.txt").write_text("written before the failing run\n")
    return wd


@pytest.fixture
def cli(capsys):
    """Runs ``train.main`` in-process; returns (exit code, stderr)."""
    from cream_jax import train

    def run(*params: str, workdir: Path, gin_files=(SMOKE,), extra=()):
        train.log.handlers.clear()  # a handler bound to an earlier test's captured stderr
        argv = [a for f in gin_files for a in ("--gin_file", f)] + ["--workdir", str(workdir), *extra]
        for p in params:
            argv += ["--gin_param", p]
        capsys.readouterr()
        code = train.main(argv)
        return code, capsys.readouterr().err

    yield run
    # The CLI gives the "cream_jax" logger its own stderr handler and stops propagation; later tests
    # (caplog on that logger) need it as it was.
    train.log.handlers.clear()
    train.log.propagate = True
    train.log.setLevel(logging.NOTSET)


def assert_one_line(err: str, code: int, expected_code: int, *needles: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last == lines[0], err[-3000:]
    assert code == expected_code, (code, last)
    for needle in needles:
        assert needle in last, (needle, last)
    return last


def refused(cli, workdir, expected_code, needles, *params, **kw):
    before = tree_digest(workdir)
    code, err = cli(*params, workdir=workdir, **kw)
    line = assert_one_line(err, code, expected_code, *needles)
    assert tree_digest(workdir) == before, "the refused run changed the workdir"
    return line


# ---------------------------------------------------------------------------------------------
# Configuration: types, ranges, choices, cross-field rules (all before any model is built).

CONFIG_CASES = [
    ('Run.iterations = "two"', "Run.iterations: expected int, got str 'two'"),
    ("Run.iterations = 2.5", "Run.iterations: expected int, got float 2.5"),
    ("Run.iterations = 0", "Run.iterations: 0 must be >= 1"),
    ("Run.iterations = True", "Run.iterations: expected int, got bool"),
    ('Run.seed = "0"', "Run.seed: expected int"),
    ("Run.method = 'nope'", "Run.method: 'nope' must be one of 'cream', 'dpo_oracle', 'length_control', 'meta_rewarding', "
                            "'scir', 'sera', 'srlm'"),
    ("Run.checkpoint_every = -1", "Run.checkpoint_every: -1 must be >= 0"),
    ('Run.keep_models_resident = "yes"', "Run.keep_models_resident: expected bool"),
    ("Run.nan_policy = 'ignore'", "Run.nan_policy: 'ignore' must be one of 'stop'"),
    ("DPO.beta = 0", "DPO.beta: 0 must be > 0"),
    ("DPO.beta = -0.1", "DPO.beta: -0.1 must be > 0"),
    ('DPO.beta = "0.1"', "DPO.beta: expected float, got str"),
    ("DPO.epochs = 0", "DPO.epochs: 0 must be >= 1"),
    ("DPO.label_smoothing = 1.5", "DPO.label_smoothing: 1.5 must be in [0, 0.5)"),
    ("DPO.label_smoothing = 0.5", "DPO.label_smoothing: 0.5 must be in [0, 0.5)"),
    ("DPO.label_smoothing = -0.1", "DPO.label_smoothing: -0.1 must be in [0, 0.5)"),
    ("DPO.loss_type = 'kto'", "DPO.loss_type: 'kto' must be one of 'sigmoid', 'ipo', 'hinge', 'simpo'"),
    ("DPOOptim.learning_rate = -1e-4", "DPOOptim.learning_rate: -0.0001 must be > 0"),
    ("DPOOptim.learning_rate = 0.0", "DPOOptim.learning_rate: 0.0 must be > 0"),
    ("DPOOptim.learning_rate = 1e6", "DPOOptim.learning_rate: 1000000.0 is over 1"),
    ("SFTOptim.learning_rate = 2.0", "SFTOptim.learning_rate: 2.0 is over 1"),
    ("PretrainOptim.learning_rate = 1e400", "PretrainOptim.learning_rate: inf must be > 0"),
    ("DPOOptim.batch_size = 12", "DPOOptim.batch_size: 12 must be a multiple of"),
    ("DPOOptim.grad_accum = 0", "DPOOptim.grad_accum: 0 must be >= 1"),
    ("DPOOptim.b2 = 1.0", "DPOOptim.b2: 1.0 must be in [0, 1)"),
    ("DPOOptim.warmup_ratio = 2.0", "DPOOptim.warmup_ratio: 2.0 must be in [0, 1]"),
    ("SFTOptim.max_grad_norm = 0.0", "SFTOptim.max_grad_norm: 0.0 must be > 0"),
    ("SFT.epochs = 0", "SFT.epochs: 0 must be >= 1"),
    ("Pretrain.steps = -5", "Pretrain.steps: -5 must be >= 0"),
    ('Guard.allow = "DPOOptim.learning_rate"', "Guard.allow: expected a tuple of str, got str"),
    ("PretrainOptim.batch_size = 0", "PretrainOptim.batch_size: 0 must be >= 1"),
    ("Data.prompts_per_iteration = -1", "Data.prompts_per_iteration: -1 must be >= 0"),
    ('Data.prompt_paths = "/data/p1.json"', "Data.prompt_paths: expected a tuple of str, got str '/data/p1.json'"),
    ('Data.eval_paths = "/data/test.json"', "Data.eval_paths: expected a tuple of str"),
    ('Data.sft_path = ("/data/sft.json",)', "Data.sft_path: expected str or None, got tuple"),
    ("Data.prompt_paths = ('/data/p1.json', '/data/p2.json')", "Data.prompt_paths: set, but Data.sft_path is None"),
    ("Data.on_bad_row = 'ignore'", "Data.on_bad_row: 'ignore' must be one of 'raise', 'skip'"),
    ("Data.max_prompt_len = 0", "Data.max_prompt_len: 0 must be >= 1"),
    ("Sampling.top_p = 0.0", "Sampling.top_p: 0.0 must be in (0, 1]"),
    ("Sampling.top_p = 1.5", "Sampling.top_p: 1.5 must be in (0, 1]"),
    ("Sampling.top_k = -1", "Sampling.top_k: -1 must be >= 0"),
    ("Sampling.temperature = -0.5", "Sampling.temperature: -0.5 must be >= 0"),
    ("Sampling.num_samples = 1", "Sampling.num_samples: 1 must be >= 2"),
    ("Sampling.layers = 'loop'", "Sampling.layers: 'loop' must be one of 'unroll', 'scan'"),
    ('Sampling.max_new_tokens = "16"', "Sampling.max_new_tokens: expected int, got str"),
    ("Mesh.fsdp = 0", "Mesh.fsdp: 0 must be >= 1, or -1"),
    ("Mesh.tensor = -2", "Mesh.tensor: -2 must be >= 1, or -1"),
    ("Mesh.data = 3", "does not divide the 8 devices"),
    ("CREAM.consistency_level = 'prompt'", "CREAM.consistency_level: 'prompt' must be one of 'dyn', 'avg'"),
    ("SeRA.ratio = 0.0", "SeRA.ratio: 0.0 must be in (0, 1]"),
    ("SeRA.ensemble_weight = 1.5", "SeRA.ensemble_weight: 1.5 must be in [0, 1]"),
    ("SRLM.judge_samples = 0", "SRLM.judge_samples: 0 must be >= 1"),
    ("SCIR.alpha = -1.0", "SCIR.alpha: -1.0 must be >= 0"),
    ("SCIR.tie_tolerance = -0.1", "SCIR.tie_tolerance: -0.1 must be >= 0"),
    ("MetaRewarding.max_judge_share = 0.7", "MetaRewarding.max_judge_share: 0.7 must be in [0, 0.5]"),
    ("LengthControl.alpha_step = 0.0", "LengthControl.alpha_step: 0.0 must be > 0"),
    ("Model.num_key_value_heads = 3", "Model.num_key_value_heads: 3 does not divide Model.num_attention_heads=2"),
    ("Model.hidden_size = 33", "Model.hidden_size: 33 is not a multiple of Model.num_attention_heads=2"),
    ("Model.dtype = 'float16'", "Model.dtype: 'float16' must be one of 'float32', 'bfloat16'"),
    ('Model.hidden_size = "32"', "Model.hidden_size: expected int, got str"),
    ("Eval.num_per_task = -1", "Eval.num_per_task: -1 must be >= 0"),
    ("Eval.batch_size = 0", "Eval.batch_size: 0 must be >= 1"),
    ("Guard.loss_factor = 1.0", "Guard.loss_factor: 1.0 must be > 1"),
    ("Guard.allow = ('DPO.beta',)", "Guard.allow: 'DPO.beta' has no sanity limit to waive"),
    ('Suite.num_test = "x"', "Suite.num_test: expected int, got str 'x'"),
    ("DPO.betta = 0.1", "DPO.betta"),
    ("Nope.value = 1", "Nope"),
    ("DPO.beta = ", "gin"),
]


@pytest.mark.parametrize("binding, needle", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_value(cli, workdir, binding, needle):
    line = refused(cli, workdir, CONFIG, [needle], binding)
    assert line.startswith("error: config: ")


def test_two_minus_one_mesh_axes(cli, workdir):
    refused(cli, workdir, CONFIG, ["at most one of Mesh.data, Mesh.fsdp, Mesh.tensor may be -1"], "Mesh.fsdp = -1")


def test_missing_gin_file(cli, workdir):
    refused(cli, workdir, CONFIG, ["/nonexistent/x.gin: file not found"], gin_files=(SMOKE, "/nonexistent/x.gin"))


def test_learning_rate_over_one_is_accepted_when_waived():
    cfg = config_lib.RunConfig(dpo=config_lib.DPOConfig(optim=config_lib.OptimConfig(learning_rate=5.0)),
                               guard=config_lib.GuardConfig(allow=("DPOOptim.learning_rate",)))
    validate.check_config(cfg, devices=1)
    with pytest.raises(errors.ConfigError, match="DPOOptim.learning_rate: 5.0 is over 1"):
        validate.check_config(config_lib.RunConfig(dpo=config_lib.DPOConfig(optim=config_lib.OptimConfig(learning_rate=5.0))), 1)


def test_every_rule_key_names_a_field():
    """The rules table cannot rot: a renamed or removed field fails here."""
    cfg = config_lib.RunConfig()
    missing = []
    for key in validate.RULES:
        try:
            validate.resolve(cfg, key)
        except AttributeError as e:
            missing.append(f"{key}: {e}")
    assert not missing, missing
    with pytest.raises(AttributeError):
        validate.resolve(cfg, "DPO.no_such_field")
    with pytest.raises(AttributeError):
        validate.resolve(cfg, "NoSection.beta")


def _with(obj, parts, field, value):
    """A copy of ``obj`` with ``field`` of the section at ``parts`` set, bypassing __post_init__."""
    out = copy.copy(obj)
    if parts:
        object.__setattr__(out, parts[0], _with(getattr(obj, parts[0]), parts[1:], field, value))
    else:
        object.__setattr__(out, field, value)
    return out


def test_defaults_pass_and_every_section_is_type_checked():
    from cream_jax.data.natural import NaturalConfig
    from cream_jax.data.synthetic import SuiteConfig

    base = dataclasses.replace(config_lib.RunConfig(), suite=SuiteConfig(), natural=NaturalConfig())
    validate.check_config(base, devices=8)
    sections = validate.gin_sections()
    assert {"Run", "Model", "Data", "DPO", "DPOOptim", "Suite", "Natural", "Mesh", "Guard"} <= set(sections)
    for name, (attr, _) in sections.items():
        parts = [p for p in attr.split(".") if p]
        section = base
        for p in parts:
            section = getattr(section, p)
        field = next(f.name for f in dataclasses.fields(section) if f.type in ("int", "float", "str", "bool"))
        with pytest.raises(errors.ConfigError, match=f"^{name}.{field}: expected .*, got object"):
            validate.check_types(_with(base, parts, field, object()))


# ---------------------------------------------------------------------------------------------
# Data files.


@pytest.fixture
def data_files(tmp_path):
    """Valid SFT, prompt (one per iteration) and eval files; a case breaks one of them."""
    d = tmp_path / "data"
    d.mkdir()
    sft = {f"s{i}": [{"role": "user", "content": f"What is {i} + 1?"},
                     {"role": "assistant", "content": f"The answer is {i + 1}."}] for i in range(8)}
    (d / "sft.json").write_text(json.dumps(sft))
    for t in (1, 2):
        rows = [{"id": f"p{t}-{i}", "prompt": f"What is {i} + {t}?", "task": "arith", "answer": str(i + t)} for i in range(8)]
        (d / f"p{t}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [{"id": f"e{i}", "question": "Who is red? (A) Ann (B) Bob (C) Cid", "label": "B", "task": "choice"} for i in range(4)]
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [{"instruction": f"What is {i} + 1?", "response": f"The answer is {i + 1 + (i % 2)}.", "score": 5 - 3 * (i % 2),
             "justification": f"The sum is {'right' if i % 2 == 0 else 'wrong'}. Score: {5 - 3 * (i % 2)}"} for i in range(4)]
    (d / "eft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def data_params(d: Path, sft="sft.json", prompts=("p1.jsonl", "p2.jsonl"), evals=("test.jsonl",), eft=None):
    return [f"Data.sft_path = '{d / sft}'", f"Data.prompt_paths = {tuple(str(d / p) for p in prompts)!r}",
            f"Data.eval_paths = {tuple(str(d / e) for e in evals)!r}"] + ([f"Data.eft_path = '{d / eft}'"] if eft else [])


def _rewrite_jsonl(path: Path, index: int, **changes):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[index].update(changes)
    rows[index] = {k: v for k, v in rows[index].items() if v is not None}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_sft_file_not_utf8_names_file_and_offset(cli, workdir, data_files):
    raw = (data_files / "sft.json").read_bytes()
    (data_files / "sft.json").write_bytes(raw[:40] + b"\xff\xfe" + raw[40:])
    refused(cli, workdir, DATA, [str(data_files / "sft.json"), "not UTF-8", "byte 0xff at offset 40"], *data_params(data_files))


def test_prompt_jsonl_not_utf8(cli, workdir, data_files):
    path = data_files / "p2.jsonl"
    path.write_bytes(path.read_bytes() + b'{"prompt": "caf\xe9"}\n')
    refused(cli, workdir, DATA, [str(path), "not UTF-8", "line 9"], *data_params(data_files))


def test_missing_sft_file(cli, workdir, data_files):
    refused(cli, workdir, DATA, [str(data_files / "missing.json"), "no such file"], *data_params(data_files, sft="missing.json"))


def test_prompt_path_is_a_directory(cli, workdir, data_files):
    (data_files / "adir.jsonl").mkdir()
    refused(cli, workdir, DATA, ["adir.jsonl: not a regular file"], *data_params(data_files, prompts=("p1.jsonl", "adir.jsonl")))


def test_invalid_json(cli, workdir, data_files):
    (data_files / "sft.json").write_text('{"a": [')
    refused(cli, workdir, DATA, ["sft.json: invalid JSON"], *data_params(data_files))


def test_top_level_number(cli, workdir, data_files):
    (data_files / "sft.json").write_text("42")
    refused(cli, workdir, DATA, ["sft.json: top level must be a dict or a list, got int"], *data_params(data_files))


def test_unsupported_extension(cli, workdir, data_files):
    (data_files / "sft.txt").write_text("hello")
    refused(cli, workdir, DATA, ["sft.txt: unsupported extension '.txt'"], *data_params(data_files, sft="sft.txt"))


def test_sft_chat_ending_with_user(cli, workdir, data_files):
    sft = json.loads((data_files / "sft.json").read_text())
    sft["s3"] = sft["s3"][:1]
    (data_files / "sft.json").write_text(json.dumps(sft))
    refused(cli, workdir, DATA, ["sft.json: key 's3'", "must end with role 'assistant'"], *data_params(data_files))


def test_sft_empty_content(cli, workdir, data_files):
    sft = json.loads((data_files / "sft.json").read_text())
    sft["s2"][1]["content"] = "  "
    (data_files / "sft.json").write_text(json.dumps(sft))
    refused(cli, workdir, DATA, ["key 's2'", "has empty content"], *data_params(data_files))


# (file, 0-based line, fields rewritten (None deletes), what the one-line message must name)
ROW_CASES = {
    "prompt_task_unknown_to_the_verifier": ("p2.jsonl", 5, {"task": "astrology"},
                                            ["p2.jsonl: line 6", "task 'astrology' is unknown to the verifier"]),
    "prompt_answer_without_task": ("p1.jsonl", 0, {"task": None}, ["p1.jsonl: line 1", "field 'answer' needs a 'task'"]),
    "prompt_numeric_answer_not_a_number": ("p1.jsonl", 2, {"answer": "seven"}, ["p1.jsonl: line 3", "'seven' is not a number"]),
    "duplicate_prompt_id": ("p1.jsonl", 1, {"id": "p1-0"}, ["p1.jsonl: line 2", "duplicate id 'p1-0'"]),
    "eval_label_not_among_the_options": ("test.jsonl", 2, {"label": "D"},
                                         ["test.jsonl: line 3", "'D' is not one of the question's options (A, B, C)"]),
    "eval_label_not_an_option_letter": ("test.jsonl", 0, {"label": "Bob"}, ["test.jsonl: line 1", "is not an option letter"]),
    "eval_task_unknown": ("test.jsonl", 1, {"task": "trivia"}, ["test.jsonl: line 2", "task 'trivia' is unknown"]),
    "eval_missing_label": ("test.jsonl", 3, {"label": None}, ["test.jsonl: line 4", "missing field 'label'"]),
    "eft_score_out_of_range": ("eft.jsonl", 1, {"score": 7}, ["eft.jsonl: line 2", "field 'score' must be an integer 0-5, got 7"]),
    "eft_justification_disagrees": ("eft.jsonl", 0, {"score": 4},
                                    ["eft.jsonl: line 1", "must give 'Score: 4' in its last 'Score:' label (what the judge read-out parses); its last 'Score:' label says 5"]),
    "eft_score_out_of_another_total": ("eft.jsonl", 2, {"score": 3, "justification": "Mostly right. Score: 3/10"},
                                       ["eft.jsonl: line 3", "it has no 'Score: k' label with k in 0-5 (out of 5)"]),
    "eft_missing_justification": ("eft.jsonl", 2, {"justification": None}, ["eft.jsonl: line 3", "missing field 'justification'"]),
    "eft_score_nan": ("eft.jsonl", 3, {"score": float("nan")}, ["eft.jsonl: line 4", "field 'score' must be an integer 0-5, got nan"]),
    "eft_score_fractional": ("eft.jsonl", 3, {"score": 2.5}, ["eft.jsonl: line 4", "field 'score' must be an integer 0-5, got 2.5"]),
}


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_bad_row(cli, workdir, data_files, case):
    name, line, fields, needles = ROW_CASES[case]
    _rewrite_jsonl(data_files / name, line, **fields)
    refused(cli, workdir, DATA, needles, *data_params(data_files, eft="eft.jsonl" if name == "eft.jsonl" else None))


def test_eval_line_not_json(cli, workdir, data_files):
    path = data_files / "test.jsonl"
    path.write_text(path.read_text() + "{not json\n")
    refused(cli, workdir, DATA, ["test.jsonl: line 5", "invalid JSON"], *data_params(data_files))


def test_every_row_bad_with_skip(cli, workdir, data_files):
    (data_files / "p1.jsonl").write_text('{"x": 1}\n{"y": 2}\n')
    refused(cli, workdir, DATA, ["p1.jsonl: no valid prompts records (2 skipped)"], *data_params(data_files),
            "Data.on_bad_row = 'skip'")


def test_eft_path_without_data_files(cli, workdir, data_files):
    refused(cli, workdir, CONFIG, ["Data.eft_path: set, but Data.sft_path is None"], f"Data.eft_path = '{data_files / 'eft.jsonl'}'")


def test_judge_examples_from_a_file_become_srlm_and_scir_judge_training(data_files, caplog):
    """Data.eft_path: SRLM's M1 learns the rubric judgments and SCIR's the pairwise verdicts from
    the file's rows; without it, with data files, the run warns that M1 learns no judging."""
    from cream_jax import methods
    from cream_jax.loop import stages

    config_lib.parse_gin([SMOKE], data_params(data_files, eft="eft.jsonl") + ["Run.method = 'srlm'"])
    cfg = config_lib.build_run_config()
    data = stages.load_task_data(cfg)
    assert [e["score"] for e in data.eft] == [5, 2, 5, 2]
    chats = methods.create(cfg).sft_examples(data.eft)
    assert len(chats) == 4 and chats[1][-1] == {"role": "assistant", "content": "The sum is wrong. Score: 2"}
    assert "What is 1 + 1?" in chats[1][-2]["content"] and "The answer is 3." in chats[1][-2]["content"]
    scir = methods.create(dataclasses.replace(cfg, method="scir"))
    # No task, no kind: the solutions are the rows scored 5; each row above 1 point is paired with
    # another question's solution, in both orders.
    verdicts = [c[-1]["content"] for c in scir.sft_examples(data.eft)]
    assert verdicts == ["1", "2"] * 4
    judges = {m: methods.create(dataclasses.replace(cfg, method=m)).learns_to_judge()
              for m in ("srlm", "scir", "meta_rewarding", "cream", "sera", "dpo_oracle")}
    assert judges == {"srlm": True, "scir": True, "meta_rewarding": True, "cream": False, "sera": False, "dpo_oracle": False}
    for base, learns in (("srlm", True), ("cream", False)):  # length control judges as its base does
        lc = dataclasses.replace(cfg, method="length_control", length_control=dataclasses.replace(cfg.length_control, base=base))
        assert methods.create(lc).learns_to_judge() is learns

    config_lib.parse_gin([SMOKE], data_params(data_files) + ["Run.method = 'srlm'"])
    cfg = config_lib.build_run_config()
    with caplog.at_level("WARNING"):
        run, _ = stages.setup(cfg, data_files.parent / "wd")
    assert run.data.eft == () and "srlm's M1 learns to judge, but these data files bring no EFT examples" in caplog.text
    assert "Data.eft_path" in caplog.text


def test_judge_examples_that_teach_nothing_or_are_unused_are_warned_about(data_files, caplog):
    """SCIR builds no pairwise chats from a valid file without solutions (no kind, no row scored 5):
    warned, as an absent file is; a method that does not learn to judge says the file is ignored."""
    from cream_jax.loop import stages

    for line in range(4):
        _rewrite_jsonl(data_files / "eft.jsonl", line, score=2, justification="The sum is wrong. Score: 2")
    for method, message in (("scir", "scir's M1 learns to judge, but it could build no judge-training chats from "
                                     "the 4 EFT examples"),
                            ("cream", "eft.jsonl is ignored: cream's M1 does not learn to judge")):
        config_lib.parse_gin([SMOKE], data_params(data_files, eft="eft.jsonl") + [f"Run.method = '{method}'"])
        caplog.clear()
        with caplog.at_level("WARNING"):
            stages.setup(config_lib.build_run_config(), data_files.parent / f"wd_{method}")
        assert message in caplog.text


def test_fewer_prompt_files_than_iterations(cli, workdir, data_files):
    refused(cli, workdir, CONFIG, ["Data.prompt_paths: 1 files, Run.iterations=2 needs one per iteration"],
            *data_params(data_files, prompts=("p1.jsonl",)))


def test_dpo_oracle_needs_answers(cli, workdir, data_files):
    _rewrite_jsonl(data_files / "p1.jsonl", 4, answer=None, task=None)
    refused(cli, workdir, DATA, ["p1.jsonl: prompt 'p1-4' has no 'answer'", "dpo_oracle"], *data_params(data_files),
            "Run.method = 'dpo_oracle'")


def test_prompt_too_long_with_on_overflow_error(cli, workdir, data_files):
    _rewrite_jsonl(data_files / "p2.jsonl", 6, prompt="a very long question " * 20)
    refused(cli, workdir, DATA, ["iteration 2 prompts: prompt 'p2-6' has", "Data.max_prompt_len=80"],
            *data_params(data_files), "Data.on_overflow = 'error'")


def test_skipped_and_truncated_rows_are_counted(data_files, tmp_path):
    """on_bad_row='skip' and over-long prompts: counted per source, ready for results.json."""
    from cream_jax.loop import stages

    path = data_files / "p1.jsonl"
    path.write_text(path.read_text() + '{"id": "bad"}\n' + json.dumps({"id": "long", "prompt": "x y z " * 60}) + "\n")
    _rewrite_jsonl(data_files / "test.jsonl", 0, question="Who is red? " * 40 + "(A) Ann (B) Bob (C) Cid")
    config_lib.parse_gin([SMOKE], data_params(data_files) + ["Data.on_bad_row = 'skip'"])
    cfg = config_lib.build_run_config()
    report = validate.check_run(cfg, tmp_path / "wd", devices=8)
    data = stages.load_task_data(cfg)
    tok = validate.check_model(cfg)
    report = validate.count_inputs(cfg, tok, data.sft, data.pools, data.tests, report)
    assert report["prompts"]["1"] == {"file": str(path), "rows": 9, "skipped": 1, "truncated": 1, "unused": 0}
    assert report["prompts"]["2"]["skipped"] == 0 and report["prompts"]["2"]["truncated"] == 0
    assert report["eval_tasks"]["choice"] == {"rows": 4, "truncated": 1}
    assert report["sft"]["truncated"] == 0 and report["sft"]["skipped"] == 0
    assert "sft_added" not in report  # CREAM adds no SFT examples
    assert not (tmp_path / "wd").exists()  # validation writes nothing


def test_judge_training_cut_by_sft_max_len_is_counted_and_named(caplog):
    """SRLM's EFT chats (a ~400-token rubric, then the judgment) cut by SFT.max_len teach no judging:
    counted in results.json's inputs and logged with the length that keeps them whole."""
    from cream_jax import methods
    from cream_jax.data import pipeline
    from cream_jax.loop import stages

    config_lib.parse_gin([SMOKE], ["Run.method = 'srlm'"])
    cfg = config_lib.build_run_config()
    data = stages.load_task_data(cfg)
    tok = validate.check_model(cfg)
    added = methods.create(cfg).sft_examples(data.eft)
    lengths = pipeline.token_lengths(tok, added, add_generation_prompt=False)
    with caplog.at_level("WARNING"):
        report = validate.count_inputs(cfg, tok, data.sft, data.pools, data.tests, {}, sft_added=added)
    assert report["sft_added"] == {"rows": len(added), "longest": max(lengths),
                                   "truncated": sum(n > cfg.sft.max_len for n in lengths)}
    assert report["sft_added"]["truncated"] > 0, "the smoke config's SFT.max_len should cut the additive rubric"
    assert f"SFT.max_len >= {max(lengths)} keeps them whole" in caplog.text and "srlm adds" in caplog.text


# ---------------------------------------------------------------------------------------------
# Model folders and tokenizers.


def _model_folder(path: Path, vocab_size: int = 512, tokenizer: bool = True) -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256}
    (path / "config.json").write_text(json.dumps(config))
    save_file({"model.embed_tokens.weight": np.zeros((vocab_size, 32), np.float32)}, str(path / "model.safetensors"))
    if tokenizer:
        for f in Path(tiny_tokenizer.EMBEDDED_TOKENIZER_DIR).iterdir():
            shutil.copy(f, path / f.name)
    return path


def test_model_folder_missing(cli, workdir, tmp_path):
    refused(cli, workdir, MODEL, [f"Model.source='{tmp_path / 'nope'}': no such folder"], f"Model.source = '{tmp_path / 'nope'}'")


def test_model_folder_without_config(cli, workdir, tmp_path):
    folder = _model_folder(tmp_path / "m")
    (folder / "config.json").unlink()
    refused(cli, workdir, MODEL, [f"{folder / 'config.json'}: missing"], f"Model.source = '{folder}'")


def test_model_config_not_json(cli, workdir, tmp_path):
    folder = _model_folder(tmp_path / "m")
    (folder / "config.json").write_text("{vocab")
    refused(cli, workdir, MODEL, ["config.json: not valid JSON"], f"Model.source = '{folder}'")


def test_model_config_without_vocab_size(cli, workdir, tmp_path):
    folder = _model_folder(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["vocab_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    refused(cli, workdir, MODEL, ["config.json: field 'vocab_size' must be a positive integer, got None"], f"Model.source = '{folder}'")


def test_model_without_weights(cli, workdir, tmp_path):
    folder = _model_folder(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    refused(cli, workdir, MODEL, [f"{folder}: no *.safetensors weights"], f"Model.source = '{folder}'")


def test_truncated_safetensors(cli, workdir, tmp_path):
    folder = _model_folder(tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    refused(cli, workdir, MODEL, [f"{weights}: truncated"], f"Model.source = '{folder}'")


def test_safetensors_header_garbage(cli, workdir, tmp_path):
    folder = _model_folder(tmp_path / "m")
    (folder / "model.safetensors").write_bytes((16).to_bytes(8, "little") + b"\x00not json header")
    refused(cli, workdir, MODEL, ["model.safetensors: not a safetensors file"], f"Model.source = '{folder}'")


def test_safetensors_shorter_than_its_header_length(cli, workdir, tmp_path):
    folder = _model_folder(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\x01\x02")
    refused(cli, workdir, MODEL, ["model.safetensors: truncated (2 bytes"], f"Model.source = '{folder}'")


def test_index_lists_a_missing_shard(cli, workdir, tmp_path):
    folder = _model_folder(tmp_path / "m")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(cli, workdir, MODEL, ["model-00001-of-00002.safetensors: missing (listed in model.safetensors.index.json)"],
            f"Model.source = '{folder}'")


def test_tokenizer_larger_than_the_vocabulary(cli, workdir, tmp_path):
    folder = _model_folder(tmp_path / "m", vocab_size=100)
    refused(cli, workdir, MODEL, ["512 tokens do not fit the model's vocab_size=100"], f"Model.source = '{folder}'")


def test_tokenizer_folder_missing(cli, workdir, tmp_path):
    refused(cli, workdir, MODEL, [f"tokenizer {tmp_path / 'tok'}: cannot be loaded"], f"Model.tokenizer = '{tmp_path / 'tok'}'")


def test_tokenizer_without_chat_template(cli, workdir, tmp_path):
    tok = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer.EMBEDDED_TOKENIZER_DIR, tok)
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    refused(cli, workdir, MODEL, [f"tokenizer {tok}: has no chat template"], f"Model.tokenizer = '{tok}'")


def test_tokenizer_json_damaged(cli, workdir, tmp_path):
    tok = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer.EMBEDDED_TOKENIZER_DIR, tok)
    (tok / "tokenizer.json").write_text("{")
    refused(cli, workdir, MODEL, [f"tokenizer {tok}: cannot be loaded"], f"Model.tokenizer = '{tok}'")


def test_context_too_short_for_the_configured_lengths(cli, workdir):
    refused(cli, workdir, CONFIG, ["exceed the model's context of 64"], "Model.max_position_embeddings = 64")


# ---------------------------------------------------------------------------------------------
# Workdirs.


def _immutable(path: Path):
    """Makes ``path`` unwritable even for root (chattr +i), else by mode bits; returns an undo."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr +i: cannot make a directory read-only")
        return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)
    mode = path.stat().st_mode
    path.chmod(0o555)
    return lambda: path.chmod(mode)


def test_workdir_is_a_file(cli, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    before = tree_digest(tmp_path)
    code, err = cli(workdir=target)
    assert_one_line(err, code, FILESYSTEM, f"--workdir {target}: exists and is not a directory")
    assert tree_digest(tmp_path) == before


def test_workdir_below_a_file(cli, tmp_path):
    (tmp_path / "file").write_text("x")
    code, err = cli(workdir=tmp_path / "file" / "run")
    assert_one_line(err, code, FILESYSTEM, "is a file, not a directory")


def test_workdir_read_only(cli, workdir):
    undo = _immutable(workdir)
    try:
        refused(cli, workdir, FILESYSTEM, [f"--workdir {workdir}: {workdir} is not writable"])
    finally:
        undo()


def test_workdir_parent_read_only(cli, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    undo = _immutable(parent)
    try:
        code, err = cli(workdir=parent / "run")
        assert_one_line(err, code, FILESYSTEM, f"cannot be created in {parent}")
    finally:
        undo()


def test_checkpoints_dir_read_only(cli, workdir):
    (workdir / "checkpoints").mkdir()
    undo = _immutable(workdir / "checkpoints")
    try:
        refused(cli, workdir, FILESYSTEM, [f"{workdir / 'checkpoints'} is not writable"])
    finally:
        undo()


def test_models_is_a_file(cli, workdir):
    (workdir / "models").write_text("not a directory")
    refused(cli, workdir, FILESYSTEM, [f"{workdir / 'models'} is not a directory"])


def test_workdir_of_another_config(cli, workdir):
    (workdir / "run.json").write_text(json.dumps({"config_hash": "0123456789abcdef"}))
    refused(cli, workdir, CONFIG, ["was created by a different config (hash 0123456789abcdef"])


def test_fixed_typo_can_rerun(cli, workdir):
    """A refused run writes no fingerprint, so the corrected command is not refused as 'another config'."""
    refused(cli, workdir, CONFIG, ["Sampling.top_p"], "Sampling.top_p = 2.0")
    assert not (workdir / "run.json").exists()


# ---------------------------------------------------------------------------------------------
# The exit path itself.


@pytest.mark.parametrize("exc, code, line", [
    (errors.ConfigError("DPO.beta: 0 must be > 0"), 2, "error: config: DPO.beta: 0 must be > 0"),
    (errors.DataError("a.json: line 3: bad"), 4, "error: data: a.json: line 3: bad"),
    (errors.ModelError("m/config.json: missing"), 5, "error: model: m/config.json: missing"),
    (errors.CheckpointError("ck: failed"), 6, "error: checkpoint: ck: failed"),
    (errors.FilesystemError("wd: read-only"), 7, "error: filesystem: wd: read-only"),
    (errors.Divergence("sft: loss 1e9"), 3, "error: divergence: sft: loss 1e9"),
    (PermissionError(13, "Permission denied", "/x/y"), 7, "error: filesystem: /x/y: Permission denied"),
    (ValueError("data: the prompt pool of iteration 1 is empty"), 4, "error: data: the prompt pool of iteration 1 is empty"),
    (ValueError("gin: No configurable matching 'X'.\n  In bindings string line 1"), 2,
     "error: config: gin: No configurable matching 'X'. In bindings string line 1"),
    (KeyboardInterrupt(), 130, "error: interrupted: Ctrl-C (SIGINT)"),
    (ZeroDivisionError("division by zero"), 1, "error: internal: ZeroDivisionError: division by zero"),
])
def test_run_cli_one_line_per_class(capsys, monkeypatch, exc, code, line):
    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)

    def failing(argv):
        raise exc

    assert errors.run_cli(failing, []) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line), err


def test_traceback_env_prints_the_traceback(capsys, monkeypatch):
    monkeypatch.setenv(errors.TRACEBACK_ENV, "1")

    def failing(argv):
        raise errors.DataError("x.json: bad")

    assert errors.run_cli(failing, []) == 4
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "error: data: x.json: bad"


def test_out_of_memory_is_one_line_with_what_to_do():
    """A real XLA allocation failure is exit 8 with the planner named, not 'a bug'. 4 PiB: beyond a
    48-bit virtual address space (256 TiB), so it fails whatever the overcommit policy (a machine with
    5-level paging that maps it skips)."""
    import jax
    import jax.numpy as jnp

    try:
        jax.jit(lambda: jnp.ones((2**50,), jnp.float32))().block_until_ready()
    except Exception as e:  # noqa: BLE001 - whatever XLA raises is what the CLI sees
        code, line = errors.classify(e)
    else:
        pytest.skip("this machine allocated 4 PiB")
    assert code == errors.OutOfMemory.exit_code == 8
    assert line.startswith("error: memory: RESOURCE_EXHAUSTED") and "python -m cream_jax.plan" in line
    assert "\n" not in line and "a bug" not in line


def test_exit_codes_are_distinct():
    codes = [cls.exit_code for cls in errors.CLASSES]
    assert len(set(codes)) == len(codes) and errors.INTERNAL_EXIT not in codes


# ---------------------------------------------------------------------------------------------
# Divergence guard.


def test_guard_stops_on_loss_spike_and_on_parameter_growth():
    import jax.numpy as jnp

    from cream_jax import guards

    cfg = config_lib.GuardConfig(warmup_logs=3, loss_factor=10.0, grad_norm_factor=100.0, param_growth=100.0)
    params = {"w": jnp.ones((4, 4))}
    guard = guards.DivergenceGuard(cfg, "sft", params, keep="/ck")
    guard.observe(1, {"loss": 50.0, "grad_norm": 1e3})  # warm-up: no limit yet
    for step, loss in enumerate([2.0, 1.5, 1.2, 1.1], start=2):
        guard.observe(step, {"loss": loss, "grad_norm": 2.0})
    guard.observe(6, {"loss": 14.0, "grad_norm": 2.0})  # 14 < 10 x median(50, 2, 1.5, 1.2, 1.1) = 15
    with pytest.raises(errors.Divergence, match=r"sft: loss 30 at step 7 is over 10x its running median 1.75 "
                                                r"\(Guard.loss_factor\); the last good checkpoint is kept in /ck"):
        guard.observe(7, {"loss": 30.0, "grad_norm": 2.0})
    guard = guards.DivergenceGuard(cfg, "iter1/train", params)
    guard.check_params(1, {"w": jnp.full((4, 4), 99.0)})
    with pytest.raises(errors.Divergence, match=r"iter1/train: the parameter norm grew 1e\+03x \(4 -> 4000\) by step 2"):
        guard.check_params(2, {"w": jnp.full((4, 4), 1000.0)})
    # A loss near zero by design (hinge) never trips the guard below the absolute floor of 1.
    guard = guards.DivergenceGuard(cfg, "hinge", params)
    for step, loss in enumerate([1e-3, 1e-3, 1e-3, 0.5], start=1):
        guard.observe(step, {"loss": loss})


def test_absurd_learning_rate_is_stopped_by_the_guard(cli, workdir):
    """lr 1e6 keeps the loss finite but blows the weights up: the run stops, no result row, no M0."""
    code, err = cli("PretrainOptim.learning_rate = 1e6", "Guard.allow = ('PretrainOptim.learning_rate',)",
                    "Pretrain.steps = 4", "Run.checkpoint_every = 2", workdir=workdir)
    line = assert_one_line(err, code, DIVERGENCE, "pretrain: ", "last good checkpoint is kept in")
    assert "parameter norm grew" in line or "over" in line
    assert not (workdir / "models" / "m0").exists()
    assert not (workdir / "results.json").exists()


# ---------------------------------------------------------------------------------------------
# Damaged model snapshot and interruptions (processes of their own where needed).


def test_damaged_model_snapshot_is_moved_aside_and_named(cli, workdir):
    from cream_jax import checkpoint
    from cream_jax.loop import stages

    config_lib.parse_gin([SMOKE], [])
    cfg = config_lib.build_run_config()
    run, params0 = stages.setup(cfg, workdir)
    run.store.save("m0", params0)
    run.store.close()
    run.ckpt.close()
    run.writer.close()
    damaged = 0
    for f in (workdir / "models" / "m0").rglob("*"):
        if f.is_file() and f.stat().st_size > 64 and "manifest" not in f.name and f.suffix != ".json":
            f.write_bytes(b"\0" * 16)
            damaged += 1
    assert damaged
    code, err = cli(workdir=workdir)
    line = assert_one_line(err, code, CHECKPOINT, "model snapshot 'm0'", str(workdir / "models" / "m0"), "moved to")
    assert not checkpoint.ModelStore(workdir / "models").exists("m0")  # a rerun recomputes it
    assert list((workdir / "models").glob("corrupt_m0_*")), line


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, XLA's default flags
    env.update({"CREAM_JAX_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"})
    return env


def test_ctrl_c_during_training_is_one_line_and_keeps_the_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "cream_jax.train", "--gin_file", SMOKE, "--workdir", str(workdir),
           "--gin_param", "Pretrain.steps = 100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            steps = [p for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()] if (workdir / "checkpoints").exists() else []
            if len(steps) >= 1:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's Python stack to stderr
            _, err = proc.communicate(timeout=60)
            pytest.fail(f"still running 120 s after SIGINT; its threads:\n{err[-6000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_one_line(err, proc.returncode, INTERRUPTED, "error: interrupted:", "rerun the same command to resume")
    from cream_jax import checkpoint

    _, progress, _ = checkpoint.RunCheckpointer(workdir / "checkpoints").restore()
    assert progress["stage"] == "pretrain"


def test_deferred_interrupts_deliver_after_the_block():
    """A SIGINT inside the block lets the block finish, then raises; SIGTERM reaches run_cli's handler."""
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with errors.deferred_interrupts():
            signal.raise_signal(signal.SIGINT)
            finished.append("block")
    assert finished == ["block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def main(argv):
        with errors.deferred_interrupts():
            signal.raise_signal(signal.SIGTERM)
            finished.append("term block")
        finished.append("after")  # never reached: the held SIGTERM raises on leaving the block

    assert errors.run_cli(main, []) == INTERRUPTED
    assert finished == ["block", "term block"]


def test_ctrl_c_inside_an_orbax_save_commits_it_then_interrupts(tmp_path, monkeypatch):
    """The CI hang: Ctrl-C landing inside orbax's save. The save completes, then the interrupt."""
    from cream_jax import checkpoint

    ckpt = checkpoint.RunCheckpointer(tmp_path / "checkpoints")
    real_save = type(ckpt._mgr).save

    def save_hit_by_ctrl_c(self, *args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # arrives while orbax is starting the save's threads
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(type(ckpt._mgr), "save", save_hit_by_ctrl_c)
    import jax.numpy as jnp

    with pytest.raises(KeyboardInterrupt):
        ckpt.save(1, {"a": jnp.ones(3)}, {"stage": "pretrain", "step": 1})
    ckpt.close()
    assert checkpoint.RunCheckpointer(tmp_path / "checkpoints").all_steps() == [1]


FAILED_WRITE = r"""
import subprocess, sys
import jax.numpy as jnp
from cream_jax import checkpoint, errors

def main(argv):
    ckpt = checkpoint.RunCheckpointer(sys.argv[1])
    ckpt.save(1, {"a": jnp.ones(3)}, {"step": 1})
    ckpt.wait()
    subprocess.run(["chattr", "+i", sys.argv[1]], check=True)
    checkpoint._probe_writable = lambda *a: None  # let orbax meet the read-only directory itself
    ckpt.save(2, {"a": jnp.ones(3)}, {"step": 2})
    ckpt.close()

sys.exit(errors.run_cli(main, []))
"""


def test_failed_async_checkpoint_write_exits_instead_of_hanging(tmp_path):
    """Regression: a save failing in orbax's background thread (read-only checkpoints/ on resume)
    left non-daemon threads waiting 20 minutes at interpreter exit."""
    if os.geteuid() != 0 or subprocess.run(["chattr", "+i", str(tmp_path)], capture_output=True).returncode:
        pytest.skip("needs root with chattr +i to make the directory read-only under a live checkpointer")
    subprocess.run(["chattr", "-i", str(tmp_path)], check=True)
    directory = tmp_path / "checkpoints"
    try:
        proc = subprocess.run([sys.executable, "-c", FAILED_WRITE, str(directory)], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=120)
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == CHECKPOINT, proc.stderr[-3000:]
    assert last.startswith("error: checkpoint: ") and "the last committed checkpoint is kept" in last, last
    from cream_jax import checkpoint

    assert checkpoint.RunCheckpointer(directory).all_steps() == [1]


def test_read_only_checkpoints_refused_before_orbax_starts(tmp_path):
    """With the write probe, a read-only checkpoints/ is one line at save time, no background failure."""
    from cream_jax import checkpoint
    import jax.numpy as jnp

    directory = tmp_path / "checkpoints"
    ckpt = checkpoint.RunCheckpointer(directory)
    ckpt.save(1, {"a": jnp.ones(3)}, {"step": 1})
    ckpt.wait()
    undo = _immutable(directory)
    try:
        with pytest.raises(errors.CheckpointError, match=f"checkpoint 2: cannot write to {directory}"):
            ckpt.save(2, {"a": jnp.ones(3)}, {"step": 2})
        ckpt.close()
    finally:
        undo()
    assert checkpoint.RunCheckpointer(directory).all_steps() == [1]


# ---------------------------------------------------------------------------------------------
# The sweep CLI validates every point before the first run.


@pytest.mark.parametrize("axis, needle", [
    ("DPO.beta=[0.1, -1.0]", "sweep point DPO.beta = -1.0: DPO.beta: -1.0 must be > 0"),
    ("Sampling.top_k=[0, 'many']", "Sampling.top_k: expected int, got str 'many'"),
    ("DPO.beta=0.1", "--sweep 'DPO.beta=0.1': expected 'Configurable.param=[v1, v2, ...]'"),
])
def test_sweep_refuses_a_bad_point_before_running_any(capsys, tmp_path, axis, needle):
    from cream_jax import sweep

    code = sweep.main(["--gin_file", SMOKE, "--sweep", axis, "--root", str(tmp_path / "sweep")])
    err = capsys.readouterr().err
    assert_one_line(err, code, CONFIG, needle)
    assert not (tmp_path / "sweep").exists()


def test_model_source_file_that_is_not_gguf(cli, workdir, tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"NOPE" + b"\0" * 64)
    refused(cli, workdir, MODEL, [f"{tmp_path / 'model.gguf'}: not a GGUF file"], f"Model.source = '{tmp_path / 'model.gguf'}'")
