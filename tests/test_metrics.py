"""Tests for cream_jax.metrics: TensorBoard event files (read back with an independent TFRecord
reader), metrics.jsonl, progress bars, results.json/csv schema, the plot, the table, samples."""

import csv
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from cream_jax import metrics


# ----------------------------------------------------------------------------------- event files


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bitwise: written here so the check does not trust tensorboardX."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_crc32c_reference_vector():
    assert _crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def _read_events(path: Path) -> list:
    """Parses a TFRecord file of tensorflow.Event protos, checking both CRCs of every record."""
    data = path.read_bytes()
    events, pos = [], 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        assert length_crc == _masked(_crc32c(header))
        payload = data[pos + 12 : pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert payload_crc == _masked(_crc32c(payload))
        event = event_pb2.Event()
        event.ParseFromString(payload)
        events.append(event)
        pos += 16 + length
    return events


def _scalars(events) -> dict:
    out = {}
    for e in events:
        for v in e.summary.value:
            if v.HasField("simple_value"):
                out.setdefault(v.tag, []).append((e.step, v.simple_value))
    return out


def test_metric_writer_event_files_and_jsonl(tmp_path):
    logdir = tmp_path / "logs"
    with metrics.MetricWriter(logdir, enabled=True) as writer:
        writer.scalars(1, {"train/loss": jnp.asarray(0.75), "consistency/tau": np.float32(0.5), "pairs/kept": 12})
        writer.scalars(2, {"train/loss": 0.25, "reward/margin": jnp.asarray(1.5, jnp.bfloat16), "consistency/tau": None})
        writer.text(2, "samples/iter_1", "Q: 2+2?\nA: 4")
        with pytest.raises(ValueError, match="metric 'train/acc': expected a scalar number, got str"):
            writer.scalars(3, {"train/acc": "high"})
        with pytest.raises(ValueError, match="metric 'v': expected a scalar number"):
            writer.scalars(3, {"v": np.ones(3)})
        with pytest.raises(ValueError, match="metric name 'step' must be a str other than"):
            writer.scalars(3, {"step": 1.0})
        writer.flush()
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = _read_events(files[0])
    assert events[0].file_version.startswith("brain.Event:")
    assert _scalars(events) == {
        "train/loss": [(1, 0.75), (2, 0.25)],
        "consistency/tau": [(1, 0.5)],
        "pairs/kept": [(1, 12.0)],
        "reward/margin": [(2, 1.5)],
    }
    texts = [v for e in events for v in e.summary.value if v.metadata.plugin_data.plugin_name == "text"]
    assert len(texts) == 1 and texts[0].tag.startswith("samples/iter_1")
    assert b"Q: 2+2?" in texts[0].SerializeToString()

    lines = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in line.items() if k != "wall_time"} for line in lines] == [
        {"step": 1, "train/loss": 0.75, "consistency/tau": 0.5, "pairs/kept": 12.0},
        {"step": 2, "train/loss": 0.25, "reward/margin": 1.5, "consistency/tau": None},
    ]
    assert all(isinstance(line["wall_time"], float) for line in lines)
    assert json.loads((logdir / "text.jsonl").read_text()) == {"step": 2, "tag": "samples/iter_1", "text": "Q: 2+2?\nA: 4"}


def test_metric_writer_resume_purges_replayed_steps(tmp_path):
    with metrics.MetricWriter(tmp_path, enabled=True) as writer:
        for step in range(1, 6):
            writer.scalars(step, {"loss": float(step)})
    with metrics.MetricWriter(tmp_path, enabled=True, purge_step=4) as writer:  # resumed after step 3
        for step in (4, 5):
            writer.scalars(step, {"loss": 10.0 * step})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["loss"]) for line in lines] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    second = _read_events(sorted(tmp_path.glob("events.out.tfevents.*"))[-1])
    # TensorBoard drops older events at steps >= 4 when it meets this SessionLog START.
    starts = [e for e in second if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START]
    assert len(starts) == 1 and starts[0].step == 4
    assert math.isnan(json.loads('{"x": NaN}')["x"])  # the reader contract for diverged metrics


def test_metric_writer_disabled_writes_nothing(tmp_path):
    writer = metrics.MetricWriter(tmp_path / "off", enabled=False)
    writer.scalars(1, {"a": 1.0})
    writer.text(1, "t", "x")
    writer.close()
    assert not (tmp_path / "off").exists()


def test_metric_writer_does_not_import_torch(tmp_path):
    code = (
        "import sys; from cream_jax import metrics; w = metrics.MetricWriter(sys.argv[1], enabled=True); "
        "w.scalars(1, {'a': 1.0}); w.close(); "
        # Not imported, and not left blocked (a None entry would make a later ``import torch`` fail).
        "assert 'torch' not in sys.modules, sys.modules.get('torch')"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True, timeout=120)


# ----------------------------------------------------------------------------------- progress


def test_progress(monkeypatch):
    monkeypatch.delenv(metrics.NO_PROGRESS_ENV, raising=False)
    bar = metrics.progress(range(5), desc="x")
    assert not bar.disable and bar.dynamic_ncols and bar.leave
    assert list(bar) == [0, 1, 2, 3, 4]
    inner = metrics.progress(total=10, desc="inner", leave=False, initial=3, disable=True)
    assert inner.disable and not inner.leave and inner.n == 3 and inner.total == 10
    inner.close()
    monkeypatch.setenv(metrics.NO_PROGRESS_ENV, "1")
    off = metrics.progress(range(3), desc="off")
    assert off.disable and list(off) == [0, 1, 2]


# ----------------------------------------------------------------------------------- results


def _rows():
    return [
        {"iteration": 0, "model": "M1", "accuracy": {"arith": 0.25, "lookup": np.float32(0.5)}, "reward_accuracy": None,
         "consistency": None, "pairs_kept": None, "seconds": {"eval": 2.0}},
        {"iteration": 1, "model": "M2", "accuracy": {"arith": jnp.asarray(0.375), "lookup": 0.625},
         "reward_accuracy": np.float64(0.8125), "consistency": {"mean": 0.712, "std": 0.05},
         "pairs_kept": np.int64(12), "pairs_tied": 3, "seconds": {"sample": 3.5, "train": 10.0, "eval": 2.0}},
        {"iteration": 2, "model": "M3", "accuracy": {"arith": 0.5, "lookup": 0.75}, "reward_accuracy": float("nan"),
         "consistency": {"mean": 0.8, "std": 0.1}, "pairs_kept": 9, "seconds": {"sample": 3.0, "train": 9.0, "eval": 2.5}},
    ]


def test_write_results_json_and_csv(tmp_path):
    config = {"method": "cream", "iterations": 2, "beta": np.float32(0.5), "mesh": (1, 1, 1)}
    out = metrics.write_results(tmp_path, config, _rows())
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == out
    assert on_disk["config"] == {"method": "cream", "iterations": 2, "beta": 0.5, "mesh": [1, 1, 1]}
    it = on_disk["iterations"]
    assert [r["iteration"] for r in it] == [0, 1, 2]
    for r in it:
        assert set(metrics.RESULT_KEYS) <= set(r)
    assert it[1] == {"iteration": 1, "model": "M2", "accuracy": {"arith": 0.375, "lookup": 0.625}, "reward_accuracy": 0.8125,
                     "consistency": {"mean": 0.712, "std": 0.05}, "pairs_kept": 12, "pairs_tied": 3,
                     "seconds": {"sample": 3.5, "train": 10.0, "eval": 2.0}}
    assert it[0]["consistency"] is None and it[0]["pairs_kept"] is None
    assert it[2]["reward_accuracy"] is None  # NaN -> null: results.json is strict JSON
    assert "NaN" not in (tmp_path / "results.json").read_text()

    with open(tmp_path / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = reader.fieldnames
    assert columns == ["iteration", "accuracy/arith", "accuracy/lookup", "reward_accuracy", "consistency/mean",
                       "consistency/std", "pairs_kept", "seconds/eval", "seconds/sample", "seconds/train",
                       "model", "pairs_tied"]
    assert rows[0] == {"iteration": "0", "accuracy/arith": "0.25", "accuracy/lookup": "0.5", "reward_accuracy": "",
                       "consistency/mean": "", "consistency/std": "", "pairs_kept": "", "seconds/eval": "2.0",
                       "seconds/sample": "", "seconds/train": "", "model": "M1", "pairs_tied": ""}
    assert rows[1]["consistency/mean"] == "0.712" and rows[1]["pairs_kept"] == "12" and rows[1]["seconds/train"] == "10.0"


def test_write_results_rejects_bad_rows(tmp_path):
    rows = _rows()
    del rows[1]["pairs_kept"]
    with pytest.raises(ValueError, match=r"write_results: iterations\[1\] is missing \['pairs_kept'\]"):
        metrics.write_results(tmp_path, {}, rows)
    rows = _rows()
    rows[2]["iteration"] = 1
    with pytest.raises(ValueError, match=r"iteration numbers repeat: \[0, 1, 1\]"):
        metrics.write_results(tmp_path, {}, rows)
    rows = _rows()
    rows[1]["consistency"] = {"mean": 0.5}
    with pytest.raises(ValueError, match=r"iterations\[1\]\['consistency'\] must be None or a dict with 'mean' and 'std'"):
        metrics.write_results(tmp_path, {}, rows)
    rows = _rows()
    rows[0]["accuracy"] = {"arith": "high"}
    with pytest.raises(ValueError, match=r"iterations\[0\]\['accuracy'\] must be a dict of numbers, got \{'arith': 'high'\}"):
        metrics.write_results(tmp_path, {}, rows)
    assert not (tmp_path / "results.json").exists()


def test_plot_results_png(tmp_path):
    results = metrics.write_results(tmp_path, {"method": "cream"}, _rows())
    path = tmp_path / "results.png"
    metrics.plot_results(results, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (400, 1000)
    assert image[..., :3].std() > 0.05  # something was drawn
    no_cons = {"config": {}, "iterations": [_rows()[0]]}
    metrics.plot_results(no_cons, tmp_path / "single.png")
    assert (tmp_path / "single.png").stat().st_size > 0


def test_format_table(tmp_path):
    table = metrics.format_table({"config": {}, "iterations": _rows()})
    lines = table.splitlines()
    assert len(lines) == 5 and len({len(line) for line in lines}) == 1  # aligned columns
    assert lines[0].split() == ["iter", "model", "arith", "lookup", "avg", "reward", "acc", "consistency", "pairs",
                                "answer", "tok", "seconds"]
    assert set(lines[1]) == {"-", " "}
    assert lines[2].split() == ["0", "M1", "0.250", "0.500", "0.375", "-", "-", "-", "-", "2.0"]
    assert lines[3].split() == ["1", "M2", "0.375", "0.625", "0.500", "0.812", "0.712±0.050", "12", "-", "15.5"]
    assert lines[4].split() == ["2", "M3", "0.500", "0.750", "0.625", "nan", "0.800±0.100", "9", "-", "14.5"]
    with_lengths = metrics.format_table({"iterations": [{**_rows()[1], "response_tokens": {"eval": 31.25, "rollout": 40.0}}]})
    assert with_lengths.splitlines()[2].split()[-2] == "31.2"
    with_total = metrics.format_table({"iterations": [{**_rows()[0], "seconds": {"eval": 2.0, "total": 30.0}}]})
    assert with_total.splitlines()[2].split()[-1] == "30.0"


def test_log_samples(tmp_path):
    samples = [
        {"prompt": "2+2? é", "responses": ["4", "5"], "rewards": np.array([1.5, -0.5], np.float32), "chosen": 0, "rejected": 1},
        {"eval": {"prompt": "x", "correct": np.bool_(True)}},
    ]
    path = metrics.log_samples(tmp_path, 3, samples)
    assert path == tmp_path / "samples" / "iter_3.jsonl"
    text = path.read_text(encoding="utf-8")
    assert "é" in text  # readable, not \\u-escaped
    assert [json.loads(line) for line in text.splitlines()] == [
        {"prompt": "2+2? é", "responses": ["4", "5"], "rewards": [1.5, -0.5], "chosen": 0, "rejected": 1},
        {"eval": {"prompt": "x", "correct": True}},
    ]
    metrics.log_samples(tmp_path, 3, samples[:1])  # a resumed iteration replaces the file
    assert len(path.read_text().splitlines()) == 1
    with pytest.raises(ValueError, match="samples must be a list of dicts"):
        metrics.log_samples(tmp_path, 4, "not a list")
