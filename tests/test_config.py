"""Config system: gin files and bindings at the edge, frozen dataclasses inside, one-line errors."""

import dataclasses

import pytest

from cream_jax import config as config_lib
from cream_jax import methods, sweep


def build(bindings=(), files=()):
    config_lib.parse_gin(files, bindings)
    return config_lib.build_run_config()


def test_defaults_and_bindings_reach_the_sections():
    cfg = build(["DPO.beta = 0.05", "Sampling.num_samples = 6", "Run.method = 'srlm'", "DPOOptim.learning_rate = 2e-5"])
    assert cfg.dpo.beta == 0.05
    assert cfg.sampling.num_samples == 6
    assert cfg.method == "srlm"
    assert cfg.dpo.optim.learning_rate == 2e-5
    # Unbound optimizer fields keep the stage's own defaults, not OptimConfig's.
    assert cfg.dpo.optim.batch_size == config_lib.DPOConfig().optim.batch_size
    assert cfg.sft.optim == config_lib.SFTConfig().optim
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dpo.beta = 1.0  # type: ignore[misc]


def test_shipped_gin_files_parse():
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent / "configs"
    for path in sorted(root.glob("*.gin")):
        files = [str(root / "tiny_cpu.gin"), str(path)] if path.name != "llama3_8b.gin" else [str(path)]
        cfg = build(files=files)
        assert cfg.method in methods.registered(), path
    assert build(files=[str(root / "tiny_cpu.gin"), str(root / "srlm.gin")]).method == "srlm"


def test_unknown_method_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"config: method='nope' is not one of") as e:
        build(["Run.method = 'nope'"])
    assert "\n" not in str(e.value)


def test_unknown_binding_and_syntax_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^gin: .*betta") as e:
        build(["DPO.betta = 0.1"])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"^gin: .*Nope"):
        build(["Nope.x = 1"])
    bad = tmp_path / "bad.gin"
    bad.write_text("DPO.beta = = 0.1\n")
    with pytest.raises(ValueError, match=r"^gin: ") as e:
        build(files=[str(bad)])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"--gin_file .*missing.gin: file not found"):
        build(files=[str(tmp_path / "missing.gin")])


def test_invalid_values_name_the_field():
    with pytest.raises(ValueError, match=r"^Sampling.num_samples: 1 must be >= 2$"):
        build(["Sampling.num_samples = 1"])
    with pytest.raises(ValueError, match=r"^CREAM.consistency_level: 'x' must be one of 'dyn', 'avg'$"):
        build(["CREAM.consistency_level = 'x'"])
    with pytest.raises(ValueError, match=r"^Model.remat_policy: 'some' must be one of 'full', 'matmuls'$"):
        build(["Model.remat_policy = 'some'"])


@pytest.mark.parametrize("model, message", [
    ({"param_dtype": "float16"}, "Model.param_dtype: 'float16' must be one of 'float32', 'bfloat16'"),
    ({"export_dtype": "int8"}, "Model.export_dtype: 'int8' must be one of None, 'float32', 'bfloat16'"),
    ({"num_hidden_layers": 0}, "Model.num_hidden_layers: 0 must be >= 1"),
])
def test_a_run_config_built_in_code_checks_the_same_rules(model, message):
    """No gin involved: RunConfig's construction applies cream_jax.validate.RULES, the one table."""
    with pytest.raises(ValueError) as e:
        config_lib.RunConfig(model=config_lib.ModelConfig(**model))
    assert str(e.value) == message
    assert config_lib.RunConfig(model=config_lib.ModelConfig(export_dtype=None)).model.export_dtype is None


@pytest.mark.parametrize("bindings, message", [
    (["DPO.loss_type = 'ipo'"], "method='cream' weights each pair by the soft label C, which only DPO.loss_type='sigmoid'"),
    (["Run.method = 'scir'", "DPO.loss_type = 'hinge'"], "method='scir' trains with its own DPO (sigmoid) term"),
    (["Run.method = 'sera'", "SeRA.ratio = 0.0"], "SeRA.ratio: 0.0 must be in (0, 1]"),
    (["Run.method = 'sera'", "SeRA.ensemble_weight = 1.5"], "SeRA.ensemble_weight: 1.5 must be in [0, 1]"),
    (["Run.method = 'scir'", "SCIR.tie_tolerance = -1.0"], "SCIR.tie_tolerance: -1.0 must be >= 0"),
])
def test_method_cross_field_errors_are_one_line(bindings, message):
    with pytest.raises(ValueError) as e:
        build(bindings)
    assert message in str(e.value) and "\n" not in str(e.value)
    build([b for b in bindings if b.startswith("Run.")])  # the method alone is fine


def test_fingerprint_changes_with_config():
    a = config_lib.fingerprint(build())
    b = config_lib.fingerprint(build(["DPO.beta = 0.2"]))
    assert a != b and a == config_lib.fingerprint(build())


def test_sweep_grid_expansion():
    grid = sweep.expand(["DPO.beta=[0.05, 0.1]", "Run.method=['cream', 'srlm']", "Data.eval_paths=[('a', 'b'), ()]"])
    assert len(grid) == 8
    assert grid[0] == ["DPO.beta = 0.05", "Run.method = 'cream'", "Data.eval_paths = ('a', 'b')"]
    assert len({sweep.run_name(g) for g in grid}) == 8
    with pytest.raises(ValueError, match="expected 'Configurable.param="):
        sweep.expand(["DPO.beta=0.1"])


def test_sweep_dry_run_prints_one_command_per_point(capsys):
    assert sweep.main(["--dry_run", "--sweep", "DPO.beta=[0.05,0.1]", "--root", "/tmp/x"]) == 0
    out = capsys.readouterr().out
    assert out.count("cream_jax.train") == 2 and "DPO.beta = 0.05" in out


def test_dataclass_defaults_are_the_embedded_default_gin():
    """A wheel ships no configs/: the defaults must be the run configs/tiny_cpu.gin describes."""
    import pathlib

    tiny = pathlib.Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.gin"
    assert build(files=[str(tiny)]) == build()
