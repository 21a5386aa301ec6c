"""Tests for cream_jax.checkpoint: round trips, retention, interrupted/corrupted saves,
resharding restores on 8 fake devices, ModelStore, run identity, the NaN guard and the
resumed-run == uninterrupted-run invariant."""

import json
import os
import re
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding

from cream_jax import checkpoint as ck
from cream_jax.sharding import logical_to_spec, make_mesh


# ----------------------------------------------------------------------------------- helpers


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "embed": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
        "mlp": {"w_df": jnp.asarray(rng.normal(size=(32, 64)), jnp.bfloat16)},
        "norm": jnp.asarray(rng.normal(size=(32,)), jnp.float32),
    }


_NAMES = {"embed": ("vocab", "embed"), "mlp": {"w_df": ("embed", "mlp")}, "norm": ("norm",)}


def _adam_state(params):
    tx = optax.adam(1e-2)
    opt = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    _, opt = tx.update(grads, opt, params)  # non-trivial mu, nu and count = 1
    return opt


def _grain_state_bytes():
    loader = grain.DataLoader(
        data_source=list(range(10)),
        sampler=grain.samplers.IndexSampler(10, shuffle=True, seed=3, num_epochs=1),
        worker_count=0,
    )
    it = iter(loader)
    next(it)
    next(it)
    state = it.get_state()
    assert isinstance(state, bytes)
    return state


def _state():
    params = _params()
    return {
        "params": params,
        "opt": _adam_state(params),
        "key": jax.random.key(7),
        "raw_key": jax.random.PRNGKey(3),
        "pairs": np.arange(12, dtype=np.int32).reshape(3, 4),
    }


def _leaf_equal(a, b):
    if jax.dtypes.issubdtype(getattr(a, "dtype", np.float32), jax.dtypes.prng_key):
        assert jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key)
        assert jax.random.key_impl(a) == jax.random.key_impl(b)
        a, b = jax.random.key_data(a), jax.random.key_data(b)
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _flat(tree):
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        out["/".join(keys)] = leaf
    return out


def _abstract(tree, sharding_fn=lambda x: getattr(x, "sharding", None)):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)), tree)


# ----------------------------------------------------------------------------------- round trip


def test_round_trip_with_and_without_target(tmp_path):
    state = _state()
    grain_bytes = _grain_state_bytes()
    progress = {
        "stage": "iter", "iteration": 2, "phase": "train", "step": 17, "losses": [1.5, 2.0], "lr": np.float32(0.5),
        "loss_bf16": jnp.asarray(0.25, jnp.bfloat16), "counts": np.array([[1, 2], [3, 4]]), "ok": np.bool_(True),
    }
    extra = {"grain": grain_bytes, "nested": {"raw": b"\x00\xff\x10", "n": 3}, "tuple": (1, 2)}
    with ck.RunCheckpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(5, state, progress, extra)
        progress["step"] = 999  # mutating after an async save must not reach the checkpoint
        ckpt.wait()
        assert ckpt.latest_step() == 5

        restored, prog, ext = ckpt.restore(abstract_state=_abstract(state))
        assert ckpt.restored_step == 5
        assert jax.tree.structure(restored) == jax.tree.structure(state)  # namedtuples kept
        jax.tree.map(_leaf_equal, state, restored)
        assert prog == {
            "stage": "iter", "iteration": 2, "phase": "train", "step": 17, "losses": [1.5, 2.0], "lr": 0.5,
            "loss_bf16": 0.25, "counts": [[1, 2], [3, 4]], "ok": True,
        }
        assert ext == {"grain": grain_bytes, "nested": {"raw": b"\x00\xff\x10", "n": 3}, "tuple": [1, 2]}

        # A grain iterator resumed from the restored bytes yields what the original would.
        loader = grain.DataLoader(
            data_source=list(range(10)),
            sampler=grain.samplers.IndexSampler(10, shuffle=True, seed=3, num_epochs=1),
            worker_count=0,
        )
        ref = iter(loader)
        next(ref), next(ref)
        resumed = iter(loader)
        resumed.set_state(ext["grain"])
        assert [next(resumed) for _ in range(4)] == [next(ref) for _ in range(4)]

        # Without a target: saved structure (dicts/lists), same values and dtypes.
        untargeted, prog2, _ = ckpt.restore()
        assert prog2 == prog
        want, got = _flat(state), _flat(untargeted)
        assert set(want) == set(got)
        for name in want:
            _leaf_equal(want[name], got[name])
        assert isinstance(got["pairs"], np.ndarray)

        # Concrete arrays are accepted as the target too.
        restored2, _, _ = ckpt.restore(step=5, abstract_state=state)
        jax.tree.map(_leaf_equal, state, restored2)


def test_async_save_is_safe_against_donation(tmp_path):
    """The trainer donates its state to the next step right after ``save`` returns."""
    x = jnp.arange(100_000, dtype=jnp.float32)
    host = np.arange(10.0)
    with ck.RunCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, {"x": x, "host": host}, {})
        x.delete()  # what donation does to the buffer
        host[:] = -1.0  # a reused host buffer
        ckpt.wait()
        restored, _, _ = ckpt.restore()
    np.testing.assert_array_equal(np.asarray(restored["x"]), np.arange(100_000, dtype=np.float32))
    np.testing.assert_array_equal(restored["host"], np.arange(10.0))


def test_bad_inputs_are_one_line_value_errors(tmp_path):
    with ck.RunCheckpointer(tmp_path, async_save=False) as ckpt:
        state = {"w": jnp.ones((2, 3))}
        with pytest.raises(ValueError, match=r"progress\['a'\]\[1\]: value of type object"):
            ckpt.save(1, state, {"a": [1, object()]})
        with pytest.raises(ValueError, match=r"extra: key 3 is not a string"):
            ckpt.save(1, state, {}, {3: "x"})
        with pytest.raises(ValueError, match="progress must be a dict"):
            ckpt.save(1, state, [1])
        with pytest.raises(ValueError, match=r"progress\['k'\]: value of dtype key<fry> is not JSON"):
            ckpt.save(1, state, {"k": jax.random.key(0)})
        ckpt.save(1, state, {"s": 1})
        with pytest.raises(ValueError, match="step 1 is not greater than the latest saved step 1"):
            ckpt.save(1, state, {"s": 1})
        assert ckpt.save(1, state, {"s": 1}, force=False) is False
        with pytest.raises(ValueError, match=r"target leaf 'w' has shape \(3, 3\), the saved one \(2, 3\)"):
            ckpt.restore(abstract_state={"w": jax.ShapeDtypeStruct((3, 3), jnp.float32)})
        with pytest.raises(ValueError, match="target tree does not match"):
            ckpt.restore(abstract_state={"v": jax.ShapeDtypeStruct((2, 3), jnp.float32)})
        with pytest.raises(FileNotFoundError):
            ckpt.restore(step=4)
        assert ckpt.all_steps() == [1]  # a wrong target never moves a good checkpoint aside
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_to_keep must be >= 1"):
            ck.RunCheckpointer(tmp_path / "x", max_to_keep=bad)


def test_progress_only_checkpoint(tmp_path):
    """Phase boundaries may save progress without arrays; it restores as an empty state."""
    with ck.RunCheckpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, {"w": jnp.ones(2)}, {"phase": "train"})
        ckpt.save(2, {}, {"phase": "curate"}, {"loader": b"\x01"})
        for target in (None, {}, lambda progress, saved: {}):
            state, progress, extra = ckpt.restore(abstract_state=target)
            assert (state, progress, extra) == ({}, {"phase": "curate"}, {"loader": b"\x01"})
        with pytest.raises(ValueError, match="checkpoint has no state arrays, the target has"):
            ckpt.restore(abstract_state={"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
        state, progress, _ = ckpt.restore(step=1)
        np.testing.assert_array_equal(np.asarray(state["w"]), np.ones(2))
        assert ckpt.all_steps() == [1, 2]


def test_retention_and_reopen(tmp_path):
    state = {"w": jnp.arange(6.0)}
    with ck.RunCheckpointer(tmp_path / "a", max_to_keep=2) as ckpt:
        for step in range(1, 6):
            ckpt.save(step, jax.tree.map(lambda x: x + step, state), {"step": step})
        ckpt.wait()
        assert ckpt.all_steps() == [4, 5]
        assert ckpt.latest_step() == 5
    with ck.RunCheckpointer(tmp_path / "a", max_to_keep=2) as again:
        assert again.latest_step() == 5
        restored, progress, _ = again.restore(abstract_state=_abstract(state))
        np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(6.0) + 5)
        assert progress == {"step": 5}
        restored, progress, _ = again.restore(step=4)
        np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(6.0) + 4)
    with ck.RunCheckpointer(tmp_path / "b", max_to_keep=1, keep_period=2, async_save=False) as ckpt:
        for step in range(1, 6):
            ckpt.save(step, state, {"step": step})
        assert ckpt.all_steps() == [2, 4, 5]
    assert sorted(os.listdir(tmp_path / "b")) == ["2", "4", "5"]


# ----------------------------------------------------------------------------------- interrupted


def test_interrupted_save_leaves_only_a_tmp_dir(tmp_path, monkeypatch):
    """A save killed before orbax's final rename leaves everything in ``<step>.orbax-checkpoint-tmp``;
    a new checkpointer ignores it, resumes from the last committed step and can reuse the step."""
    from orbax.checkpoint._src.path import atomicity

    directory = tmp_path / "ckpt"
    ckpt = ck.RunCheckpointer(directory)
    ckpt.save(1, {"w": jnp.ones(3)}, {"step": 1})
    ckpt.wait()

    async def killed(self, *args, **kwargs):
        raise RuntimeError("simulated kill before rename")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", killed)
    with pytest.raises(RuntimeError, match="simulated kill"):
        ckpt.save(2, {"w": jnp.ones(3) * 2}, {"step": 2})
        ckpt.wait()
    monkeypatch.undo()

    entries = sorted(os.listdir(directory))
    assert entries[0] == "1" and len(entries) == 2 and entries[1].startswith("2.orbax-checkpoint-tmp")
    tmp_items = sorted(os.listdir(directory / entries[1]))
    assert any(name.startswith("state") for name in tmp_items)  # the arrays were written, not committed

    with ck.RunCheckpointer(directory) as resumed:
        assert resumed.latest_step() == 1
        state, progress, _ = resumed.restore()
        assert progress == {"step": 1}
        np.testing.assert_array_equal(np.asarray(state["w"]), np.ones(3))
        resumed.save(2, {"w": jnp.ones(3) * 2}, {"step": 2})
        resumed.wait()
        assert resumed.all_steps() == [1, 2]
        assert resumed.restore()[1] == {"step": 2}
    assert sorted(os.listdir(directory)) == ["1", "2"]


@pytest.mark.parametrize("damage", ["array_data", "progress_file"])
def test_corrupted_latest_falls_back_and_is_moved_aside(tmp_path, damage):
    directory = tmp_path / "ckpt"
    state = {"w": jnp.arange(8.0).reshape(2, 4)}
    with ck.RunCheckpointer(directory, async_save=False) as ckpt:
        ckpt.save(1, state, {"step": 1})
        ckpt.save(2, jax.tree.map(lambda x: x * 2, state), {"step": 2})
    # Damage the committed step 2 after the fact (a disk fault, a truncated copy).
    if damage == "array_data":
        removed = 0
        for root, _, files in os.walk(directory / "2" / "state"):
            if os.path.basename(root) == "d":
                for f in files:
                    os.remove(os.path.join(root, f))
                    removed += 1
        assert removed > 0
    else:
        os.remove(directory / "2" / "progress" / "metadata")

    with ck.RunCheckpointer(directory) as ckpt:
        assert ckpt.latest_step() == 2
        restored, progress, _ = ckpt.restore(abstract_state=_abstract(state))
        assert ckpt.restored_step == 1 and progress == {"step": 1}
        np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(8.0).reshape(2, 4))
        assert ckpt.latest_step() == 1
        moved = [n for n in os.listdir(directory) if n.startswith("corrupt_step_2_")]
        assert len(moved) == 1
        ckpt.save(2, state, {"step": 2, "again": True})  # the step number is free again
        ckpt.wait()
        assert ckpt.restore()[1] == {"step": 2, "again": True}


def test_all_checkpoints_unreadable_raises(tmp_path):
    with ck.RunCheckpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, {"w": jnp.ones(3)}, {})
    os.remove(tmp_path / "1" / "progress" / "metadata")
    with ck.RunCheckpointer(tmp_path) as ckpt:
        with pytest.raises(RuntimeError, match=r"none of the checkpoints \[1\]"):
            ckpt.restore()
        assert ckpt.all_steps() == [1]  # nothing moved when there is no good one to fall back to
    with ck.RunCheckpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
            ckpt.restore()


def test_callable_target_for_shapes_known_only_from_the_checkpoint(tmp_path):
    pairs = np.arange(15, dtype=np.int32).reshape(5, 3)  # e.g. the curated pairs of iteration 2
    state = {"params": _params(), "pairs": pairs}
    with ck.RunCheckpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(3, state, {"iteration": 2, "num_pairs": 5})
        seen = {}

        def target(progress, saved):
            seen["progress"] = progress
            seen["pairs"] = saved["pairs"]
            dev = SingleDeviceSharding(jax.devices()[1])
            return {
                "params": _abstract(_params(), lambda x: dev),
                "pairs": jax.ShapeDtypeStruct(saved["pairs"].shape, saved["pairs"].dtype, sharding=dev),
            }

        restored, _, _ = ckpt.restore(abstract_state=target)

        def buggy(progress, saved):
            return {"params": saved["missing"]}

        for step in (None, 3):  # the caller's exception comes through unchanged; nothing is moved aside
            with pytest.raises(KeyError, match="missing"):
                ckpt.restore(step, abstract_state=buggy)
        assert ckpt.all_steps() == [3]
    assert seen["progress"] == {"iteration": 2, "num_pairs": 5}
    assert seen["pairs"].shape == (5, 3) and seen["pairs"].dtype == np.int32
    assert restored["pairs"].sharding == SingleDeviceSharding(jax.devices()[1])
    np.testing.assert_array_equal(np.asarray(restored["pairs"]), pairs)
    jax.tree.map(_leaf_equal, state["params"], restored["params"])


# ----------------------------------------------------------------------------------- resharding


def _mesh_shardings(tree_names, tree, mesh):
    return jax.tree.map(
        lambda names, x: NamedSharding(mesh, logical_to_spec(names, x.shape, mesh)),
        tree_names,
        tree,
        is_leaf=lambda n: isinstance(n, tuple),
    )


def test_restore_reshards_between_8_devices_and_1(tmp_path):
    assert len(jax.devices()) == 8
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    host = jax.tree.map(np.asarray, _params(1))
    mesh_sh = _mesh_shardings(_NAMES, host, mesh)
    assert mesh_sh["embed"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    one = SingleDeviceSharding(jax.devices()[0])

    def check_placed(restored, shardings):
        for got, want, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(host), jax.tree.leaves(shardings)):
            assert got.sharding == sh
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
            for shard in got.addressable_shards:  # every device holds exactly its slice
                np.testing.assert_array_equal(
                    np.asarray(shard.data, np.float32), np.asarray(want, np.float32)[shard.index]
                )

    # 8 devices -> 1 device (params and adam moments).
    sharded = jax.tree.map(lambda x, s: jax.device_put(x, s), host, mesh_sh)
    opt = _adam_state(sharded)
    assert len(jax.tree.leaves(sharded)[0].sharding.device_set) == 8
    with ck.RunCheckpointer(tmp_path / "from8", async_save=False) as ckpt:
        ckpt.save(1, {"params": sharded, "opt": opt}, {})
        target = {"params": _abstract(sharded, lambda x: one), "opt": _abstract(opt, lambda x: one)}
        restored, _, _ = ckpt.restore(abstract_state=target)
    check_placed(restored["params"], jax.tree.map(lambda _: one, host))
    jax.tree.map(_leaf_equal, jax.device_get(opt), jax.device_get(restored["opt"]))
    assert restored["opt"][0].mu["embed"].sharding == one

    # 1 device -> 8 devices.
    single = jax.tree.map(lambda x: jax.device_put(x, one), host)
    with ck.RunCheckpointer(tmp_path / "from1", async_save=False) as ckpt:
        ckpt.save(1, {"params": single}, {})
        target = {"params": jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), host, mesh_sh)}
        restored, _, _ = ckpt.restore(abstract_state=target)
    check_placed(restored["params"], mesh_sh)


# ----------------------------------------------------------------------------------- ModelStore


def test_model_store(tmp_path):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    store = ck.ModelStore(tmp_path / "models")
    m0, m1 = _params(0), _params(1)
    assert not store.exists("m0")
    store.save("m0", m0)
    store.save("m1", m1)
    assert store.exists("m0") and store.exists("m1") and not store.exists("iter_2")
    assert store.names() == ["m0", "m1"]

    shardings = _mesh_shardings(_NAMES, m1, mesh)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), m1, shardings)
    loaded = store.load("m1", target)
    for got, want, sh in zip(jax.tree.leaves(loaded), jax.tree.leaves(m1), jax.tree.leaves(shardings)):
        assert got.sharding == sh
        _leaf_equal(want, got)
    jax.tree.map(_leaf_equal, m0, store.load("m0"))

    store.save("m1", m0)  # a resumed run may write the same name again
    jax.tree.map(_leaf_equal, m0, store.load("m1"))

    with pytest.raises(FileNotFoundError, match="no model 'iter_2'"):
        store.load("iter_2")
    with pytest.raises(ValueError, match="model name '../x' must match"):
        store.save("../x", m0)
    with pytest.raises(ValueError, match=r"target leaf 'norm' has shape \(7,\)"):
        wrong = {**jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), m0), "norm": jax.ShapeDtypeStruct((7,), jnp.float32)}
        store.load("m0", wrong)
    store.close()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_model_snapshot_is_moved_aside(tmp_path, damage):
    """A snapshot that cannot be read is moved aside, named in one CheckpointError line, and no
    longer exists, so the trainer recomputes that stage on the next run."""
    store = ck.ModelStore(tmp_path / "models")
    m0 = _params(0)
    store.save("m0", m0)
    store.save("m1", _params(1))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), m0)
    data_files = [f for f in (tmp_path / "models" / "m0").rglob("*") if f.is_file() and "d" == f.parent.name]
    assert data_files
    for f in data_files:
        if damage == "truncate":
            f.write_bytes(f.read_bytes()[:10])
        else:
            f.unlink()
    with pytest.raises(ck.CheckpointError, match=r"model snapshot 'm0' \(.*models/m0\) cannot be read .* moved to "):
        store.load("m0", target)
    assert not store.exists("m0") and store.names() == ["m1"]
    assert len(list((tmp_path / "models").glob("corrupt_m0_*"))) == 1
    store.save("m0", m0)  # the recomputed snapshot takes the name again
    jax.tree.map(_leaf_equal, m0, store.load("m0", target))
    store.close()
    store.close()  # idempotent


def test_close_all_finishes_every_open_writer(tmp_path):
    ckpt = ck.RunCheckpointer(tmp_path / "ck")
    store = ck.ModelStore(tmp_path / "models")
    ckpt.save(1, _params(0), {"step": 1})
    store.save("m0", _params(0))
    ck.close_all()
    assert ck.RunCheckpointer(tmp_path / "ck").all_steps() == [1]
    assert ck.ModelStore(tmp_path / "models").exists("m0")
    assert ckpt not in ck._OPEN and store not in ck._OPEN


# ----------------------------------------------------------------------------------- run identity


def test_run_identity(tmp_path):
    text = "# Parameters for train:\ntrain.method = 'cream'\ntrain.iterations = 2\n"
    fp = ck.config_fingerprint(text)
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert ck.config_fingerprint("train.method = 'cream'   \n\n# other comment\ntrain.iterations = 2") == fp
    other = ck.config_fingerprint(text.replace("= 2", "= 3"))
    assert other != fp

    workdir = tmp_path / "run"
    assert ck.check_run_matches(workdir, fp) is False  # fresh
    ck.write_run_info(workdir, config_text=text, config_hash=fp, git_hash="abc123")
    assert (workdir / "operative_config.gin").read_text() == text
    info = json.loads((workdir / "run.json").read_text())
    assert info["config_hash"] == fp and info["git_hash"] == "abc123" and info["versions"]["jax"] == jax.__version__
    assert ck.check_run_matches(workdir, fp) is True
    with pytest.raises(ValueError) as err:
        ck.check_run_matches(workdir, other)
    assert str(err.value) == (
        f"workdir {workdir} was created by a different config (hash {fp} != {other}); "
        "use a new --workdir or the same config"
    )
    ck.write_run_info(workdir, config_text=text, config_hash=fp, git_hash=None)
    assert json.loads((workdir / "run.json").read_text())["created"] == info["created"]
    (workdir / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read run info"):
        ck.check_run_matches(workdir, fp)


def test_git_hash(tmp_path):
    outside = tmp_path / "nogit"
    outside.mkdir()
    assert ck.git_hash(outside) is None
    assert ck.git_hash(tmp_path / "does_not_exist") is None
    here = ck.git_hash()
    if shutil.which("git") and here is not None:
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", here)


# ----------------------------------------------------------------------------------- NaN guard


def test_is_finite_tree():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    good = {
        "a": jnp.ones((4, 4), jnp.bfloat16),
        "i": jnp.arange(3),
        "k": jax.random.key(0),
        "n": np.ones(3),
        "f": 1.5,
        "s": jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, logical_to_spec(("batch", None)))),
    }
    assert ck.is_finite_tree(good) is True
    assert ck.is_finite_tree({}) is True
    bad_sharded = jnp.ones((8, 4)).at[5, 1].set(jnp.nan)
    assert ck.is_finite_tree({**good, "s": jax.device_put(bad_sharded, good["s"].sharding)}) is False
    assert ck.is_finite_tree({**good, "a": good["a"].at[0, 0].set(jnp.inf)}) is False
    assert ck.is_finite_tree({**good, "n": np.array([1.0, -np.inf])}) is False
    assert ck.is_finite_tree({**good, "f": float("nan")}) is False


# ----------------------------------------------------------------------------------- resume invariant


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    """Train 6 noisy adam steps straight through, and 3 + (kill, reopen, restore) + 3: bitwise equal."""
    tx = optax.adam(0.05)
    traces = []

    @jax.jit
    def train_step(state, x):
        traces.append(1)
        key, sub = jax.random.split(state["key"])
        loss = lambda p: jnp.sum((p["w"] * x - 1.0) ** 2)
        grads = jax.grad(loss)(state["params"])
        grads = {"w": grads["w"] + 0.1 * jax.random.normal(sub, grads["w"].shape)}
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt, "key": key}

    def init():
        params = {"w": jnp.linspace(-1.0, 1.0, 4)}
        return {"params": params, "opt": tx.init(params), "key": jax.random.key(11)}

    def data():
        return iter(grain.MapDataset.range(50).shuffle(seed=5).map(lambda i: np.float32(i) / 50).to_iter_dataset())

    state, it = init(), data()
    for _ in range(6):
        state = train_step(state, jnp.full((4,), next(it)))
    uninterrupted = state

    state, it = init(), data()
    ckpt = ck.RunCheckpointer(tmp_path / "run", async_save=True)
    for step in range(1, 4):
        state = train_step(state, jnp.full((4,), next(it)))
        ckpt.save(step, state, {"stage": "train", "step": step}, {"data": it.get_state()})
    ckpt.wait()
    del state, it, ckpt  # the "kill"

    resumed = ck.RunCheckpointer(tmp_path / "run")
    state, progress, extra = resumed.restore(abstract_state=_abstract(init()))
    it = data()
    it.set_state(extra["data"])
    for step in range(progress["step"] + 1, 7):
        state = train_step(state, jnp.full((4,), next(it)))
    resumed.close()
    assert progress["step"] == 3
    jax.tree.map(_leaf_equal, uninterrupted, state)
    assert len(traces) == 1  # the restored state has the same avals: no retrace
