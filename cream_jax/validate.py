"""Everything a run needs, checked before anything is trained or written.

`check_run` is the trainer's first call: the whole `RunConfig` (types of every field, the `RULES`
table of ranges and choices, the cross-field `CROSS_RULES`), the workdir, the data files, the model
folder and the tokenizer. Each problem raises one `cream_jax.errors` exception whose message names
the field (by its gin name, ``DPO.beta``) or the file (and the record or byte offset). Only after
it passes does the trainer write the workdir's config fingerprint, so a fixed typo can rerun.

The type checks are generic: they walk ``dataclasses.fields`` of whatever sections the config has
and compare each value with its annotation, so new sections and fields are covered without edits
here. Gin names come from the config module's own registry (`gin_sections`). The `RULES` table is
keyed by gin name; a test fails if a key names no field, so the table cannot rot when fields move.
`check_gin_bindings` applies the same type checks to the parsed gin bindings before the config is
built, so a wrongly typed value never reaches a ``__post_init__`` comparison.

`count_inputs` reports rows skipped (``Data.on_bad_row='skip'``) and truncated (over-long prompts,
SFT examples, eval questions) per source; the trainer logs the report and puts it in results.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import types
import typing
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cream_jax import config as config_lib
from cream_jax.errors import ConfigError, DataError, FilesystemError, ModelError

log = logging.getLogger("cream_jax")

# ---------------------------------------------------------------------------------------------
# Gin names of the config's sections, from the config module's registry.


def gin_sections() -> dict[str, tuple[str, Any]]:
    """``{gin name: (attribute path in RunConfig, class or function)}`` of every section.

    "" is the RunConfig itself (gin name "Run"); nested paths are dotted ("dpo.optim").
    """
    out: dict[str, tuple[str, Any]] = {"Run": ("", config_lib.RunConfig)}
    for name, (attr, cls) in getattr(config_lib, "_SECTIONS", {}).items():
        out[name] = (attr, cls)
    optim_cls = getattr(config_lib, "OptimConfig", None)
    for name, attr in getattr(config_lib, "_OPTIM_SECTIONS", {}).items():
        out[name] = (f"{attr}.optim", optim_cls)
    if "Suite" not in out:
        from cream_jax.data.synthetic import SuiteConfig  # noqa: PLC0415

        out["Suite"] = ("suite", SuiteConfig)
    if "Natural" not in out:
        from cream_jax.data.natural import NaturalConfig  # noqa: PLC0415

        out["Natural"] = ("natural", NaturalConfig)
    return out


def _gin_name_of_path() -> dict[str, str]:
    return {attr: name for name, (attr, _) in gin_sections().items()}


def resolve(cfg: Any, key: str) -> Any:
    """The value a rule key ("DPOOptim.learning_rate") names in ``cfg``; AttributeError if none."""
    section, _, field = key.rpartition(".")
    if section not in gin_sections():
        raise AttributeError(f"no config section named {section!r} (known: {sorted(gin_sections())})")
    attr = gin_sections()[section][0]
    obj = cfg
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    if obj is None and section == "Suite":
        from cream_jax.data.synthetic import SuiteConfig  # noqa: PLC0415

        obj = SuiteConfig()
    if not dataclasses.is_dataclass(obj) or field not in {f.name for f in dataclasses.fields(obj)}:
        raise AttributeError(f"section {section} has no field {field!r}")
    return getattr(obj, field)


# ---------------------------------------------------------------------------------------------
# Generic, annotation-driven type checks.


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # noqa: BLE001 - an annotation we cannot resolve is not checked
        return {}


def _describe(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if ann is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(ann))
    if origin in (tuple, list):
        args = typing.get_args(ann)
        inner = _describe(args[0]) if args else "values"
        return f"a tuple of {inner}"
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(ann))
    return getattr(ann, "__name__", str(ann))


def _matches(value: Any, ann: Any) -> bool:
    if ann is Any or ann is object:
        return True
    if ann is type(None):
        return value is None
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(ann))
    if origin is typing.Literal:
        return value in typing.get_args(ann)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        args = typing.get_args(ann)
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):  # list[X], tuple[X, ...]
            return all(_matches(v, args[0]) for v in value) if args else True
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))  # tuple[X, Y]
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(ann, type):
        return isinstance(value, ann)
    return True  # an annotation form we do not interpret


def check_value(name: str, value: Any, ann: Any) -> None:
    """Raises ConfigError naming ``name`` if ``value`` does not fit the annotation ``ann``."""
    if _matches(value, ann):
        return
    expected = _describe(ann)
    hint = ""
    if isinstance(value, str) and "tuple" in expected:
        hint = f" (a single one is written ({value!r},))"
    raise ConfigError(f"{name}: expected {expected}, got {type(value).__name__} {value!r}{hint}")


def check_types(cfg: Any, section: str = "Run") -> None:
    """Checks every field of a config dataclass against its annotation, recursing into sections."""
    names = _gin_name_of_path()

    def walk(obj: Any, path: str) -> None:
        hints = _hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            sub = f"{path}.{f.name}" if path else f.name
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                walk(value, sub)
                continue
            gin = names.get(path, path.split(".")[-1].capitalize() if path else section)
            check_value(f"{gin}.{f.name}", value, hints.get(f.name, Any))

    walk(cfg, "")


def check_gin_bindings() -> None:
    """Type- and rule-checks the gin bindings parsed by `config.parse_gin`, before the config is
    built (so no dataclass ``__post_init__`` meets a wrongly typed value first)."""
    import gin  # noqa: PLC0415 - gin lives at the edge

    try:
        allowed = gin.query_parameter("Guard.allow")
    except ValueError:
        allowed = ()
    check_value("Guard.allow", allowed, tuple[str, ...])
    allowed = _check_allow(allowed)
    for name, (_, target) in gin_sections().items():
        if name == "Run":
            target = getattr(config_lib, "_run_fields", target)
        hints = _hints(target)
        for param, ann in hints.items():
            if param == "return":
                continue
            try:
                value = gin.query_parameter(f"{name}.{param}")
            except ValueError:  # not bound
                continue
            if type(value).__module__.startswith("gin"):  # a @reference or macro: gin resolves it
                continue
            check_value(f"{name}.{param}", value, ann)
            check_rule(f"{name}.{param}", value, allowed)


# ---------------------------------------------------------------------------------------------
# Ranges and choices, keyed by gin name.


@dataclasses.dataclass(frozen=True)
class Rule:
    """``test(value)`` must hold; ``expect`` says what is wanted. A ``sanity`` limit refuses values
    that are legal but almost surely a typo; ``Guard.allow = ("Section.field",)`` waives it."""

    test: Callable[[Any], bool]
    expect: str | Callable[[], str]  # a callable for choices known only at run time (the method registry)
    sanity: bool = False

    def says(self) -> str:
        return self.expect() if callable(self.expect) else self.expect


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def at_least(n: float) -> Rule:
    return Rule(lambda v: _finite(v) and v >= n, f"must be >= {n:g}")


def positive() -> Rule:
    return Rule(lambda v: _finite(v) and v > 0, "must be > 0")


def within(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def test(v):
        return _finite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return Rule(test, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")


def one_of(*values: Any) -> Rule:
    return Rule(lambda v: v in values, f"must be one of {', '.join(map(repr, values))}")


def mesh_axis() -> Rule:
    return Rule(lambda v: isinstance(v, int) and (v >= 1 or v == -1), "must be >= 1, or -1 (all devices left)")


def _optim_rules(section: str) -> dict[str, Rule]:
    return {
        f"{section}.learning_rate": positive(),
        f"{section}.end_lr_ratio": within(0, 1),
        f"{section}.warmup_ratio": within(0, 1),
        f"{section}.weight_decay": at_least(0),
        f"{section}.max_grad_norm": positive(),
        f"{section}.b1": within(0, 1, hi_open=True),
        f"{section}.b2": within(0, 1, hi_open=True),
        f"{section}.eps": positive(),
        f"{section}.batch_size": at_least(1),
        f"{section}.grad_accum": at_least(1),
    }


def _sanity_rules(section: str) -> dict[str, Rule]:
    return {f"{section}.learning_rate": Rule(lambda v: v <= 1.0, "is over 1, which destroys the weights", sanity=True)}


_OPTIMS = tuple(getattr(config_lib, "_OPTIM_SECTIONS", {}))

RULES: dict[str, list[Rule]] = {}


def _registered_methods() -> tuple[str, ...]:
    from cream_jax import methods  # noqa: PLC0415 - the registry imports jax; a gin `import` may add methods

    return tuple(methods.registered())


def _add(table: dict[str, Rule]) -> None:
    for key, rule in table.items():
        RULES.setdefault(key, []).append(rule)


_add({
    "Run.method": Rule(lambda v: v in _registered_methods(),
                       lambda: f"must be one of {', '.join(map(repr, sorted(_registered_methods())))} (or a method registered "
                               "with cream_jax.methods.register)"),
    "Run.iterations": at_least(1),
    "Run.checkpoint_every": at_least(0),
    "Run.nan_policy": one_of("stop"),
    "Model.dtype": one_of("float32", "bfloat16"),
    "Model.param_dtype": one_of("float32", "bfloat16"),
    "Model.export_dtype": one_of(None, "float32", "bfloat16"),
    "Model.remat_policy": one_of("full", "matmuls"),
    "Model.hidden_size": at_least(1),
    "Model.intermediate_size": at_least(1),
    "Model.num_hidden_layers": at_least(1),
    "Model.num_attention_heads": at_least(1),
    "Model.num_key_value_heads": at_least(1),
    "Model.max_position_embeddings": at_least(1),
    "Model.rope_theta": positive(),
    "Data.max_prompt_len": at_least(1),
    "Data.on_overflow": one_of("truncate", "error"),
    "Data.on_bad_row": one_of("raise", "skip"),
    "Data.prompts_per_iteration": at_least(0),
    "Data.suite": one_of("embedded", "natural"),
    "Pretrain.steps": at_least(0),
    "Pretrain.seq_len": at_least(2),
    "SFT.epochs": at_least(1),
    "SFT.max_len": at_least(2),
    "Sampling.num_samples": at_least(2),
    "Sampling.temperature": at_least(0),
    "Sampling.top_p": within(0, 1, lo_open=True),
    "Sampling.top_k": at_least(0),
    "Sampling.max_new_tokens": at_least(1),
    "Sampling.batch_size": at_least(1),
    "Sampling.layers": one_of("unroll", "scan"),
    "Reward.reward_reference": one_of("initial", "previous"),
    "Reward.consistency_method": one_of("kendall", "spearman", "toporder"),
    "Reward.ties": one_of("b", "ordinal"),
    "Reward.score_batch_size": at_least(1),
    # Per-method sections (a method's own cross-field checks are its Method.validate hook).
    "CREAM.consistency_level": one_of("dyn", "avg"),
    "SRLM.judge_readout": one_of("expected", "sample"),
    "SRLM.judge_template": one_of("additive", "compact"),
    "SRLM.judge_samples": at_least(1),
    "SRLM.max_judgment_tokens": at_least(1),
    "SeRA.ratio": within(0, 1, lo_open=True),
    "SeRA.ensemble_weight": within(0, 1),
    "SCIR.alpha": at_least(0),
    "SCIR.gamma": at_least(0),
    "SCIR.divergence": one_of("skl", "bce", "mse"),
    "SCIR.tie_tolerance": at_least(0),
    "LengthControl.alpha": Rule(lambda v: v is None or (_finite(v) and v >= 0),
                                "must be >= 0 (a length penalty) or None (searched)"),
    "LengthControl.alpha_max": positive(),
    "LengthControl.alpha_step": positive(),
    "MetaRewarding.judge_template": one_of("additive", "compact"),
    "MetaRewarding.judge_samples": Rule(lambda v: _finite(v) and v >= 2, "must be >= 2 (the meta-judge compares judgments)"),
    "MetaRewarding.score_readout": one_of("parsed", "expected"),
    "MetaRewarding.max_judgment_tokens": at_least(1),
    "MetaRewarding.max_judge_share": within(0, 0.5),
    "DPO.beta": positive(),
    "DPO.loss_type": one_of("sigmoid", "ipo", "hinge", "simpo"),
    "DPO.label_smoothing": within(0, 0.5, hi_open=True),
    "DPO.epochs": at_least(1),
    "Eval.max_new_tokens": at_least(1),
    "Eval.batch_size": at_least(1),
    "Eval.num_per_task": at_least(0),
    "Eval.num_logged_samples": at_least(0),
    "Mesh.data": mesh_axis(),
    "Mesh.fsdp": mesh_axis(),
    "Mesh.tensor": mesh_axis(),
    "Guard.warmup_logs": at_least(1),
    "Guard.loss_factor": Rule(lambda v: _finite(v) and v > 1, "must be > 1"),
    "Guard.grad_norm_factor": Rule(lambda v: _finite(v) and v > 1, "must be > 1"),
    "Guard.param_growth": Rule(lambda v: _finite(v) and v > 1, "must be > 1"),
})
for _section in _OPTIMS:
    _add(_optim_rules(_section))
    _add(_sanity_rules(_section))


def _check_allow(allowed: Any) -> set:
    allowed = set(allowed or ())
    for key in allowed:
        if key not in RULES or not any(r.sanity for r in RULES[key]):
            waivable = sorted(k for k, rules in RULES.items() if any(r.sanity for r in rules))
            raise ConfigError(f"Guard.allow: {key!r} has no sanity limit to waive (waivable: {', '.join(waivable)})")
    return allowed


def check_rule(key: str, value: Any, allowed: set = frozenset()) -> None:
    """Applies the `RULES` of one key to a value (sanity limits waived for keys in ``allowed``)."""
    for rule in RULES.get(key, ()):
        if rule.sanity and key in allowed:
            continue
        if not rule.test(value):
            extra = f" (Guard.allow = ({key!r},) accepts it)" if rule.sanity else ""
            raise ConfigError(f"{key}: {value!r} {rule.says()}{extra}")


def check_rules(cfg: Any, skip: tuple[str, ...] = ()) -> None:
    """Applies `RULES` (but those of the keys in ``skip``); a sanity rule is skipped for keys listed
    in ``Guard.allow``. Every `RunConfig` runs it on construction."""
    allowed = _check_allow(getattr(getattr(cfg, "guard", None), "allow", ()))
    for key in RULES:
        if key not in skip:
            check_rule(key, resolve(cfg, key), allowed)


# ---------------------------------------------------------------------------------------------
# Cross-field rules: each takes (cfg, number of devices) and raises.


def _mesh_sizes(cfg: Any, devices: int) -> tuple[int, int, int]:
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    if sizes.count(-1) > 1:
        raise ConfigError(f"Mesh: at most one of Mesh.data, Mesh.fsdp, Mesh.tensor may be -1, got {sizes}")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if devices % fixed:
            raise ConfigError(f"Mesh: the fixed axes' product {fixed} (Mesh.data x Mesh.fsdp x Mesh.tensor = {sizes}) "
                              f"does not divide the {devices} devices")
        sizes[sizes.index(-1)] = devices // fixed
    elif devices % fixed:
        raise ConfigError(f"Mesh: Mesh.data x Mesh.fsdp x Mesh.tensor = {fixed} does not divide the {devices} devices")
    return sizes[0], sizes[1], sizes[2]


def _rule_mesh_and_batches(cfg: Any, devices: int) -> None:
    data, fsdp, _ = _mesh_sizes(cfg, devices)
    for section in _OPTIMS:
        optim = resolve(cfg, f"{section}.batch_size"), resolve(cfg, f"{section}.grad_accum")
        multiple = data * fsdp * optim[1]
        if optim[0] % multiple:
            raise ConfigError(f"{section}.batch_size: {optim[0]} must be a multiple of Mesh data x fsdp x "
                              f"{section}.grad_accum = {data} x {fsdp} x {optim[1]} = {multiple}")


def _rule_heads(cfg: Any, devices: int) -> None:
    m = cfg.model
    if m.source != "embedded":
        return  # an HF checkpoint brings its own shape
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"Model.hidden_size: {m.hidden_size} is not a multiple of Model.num_attention_heads={m.num_attention_heads}")
    if m.num_attention_heads % m.num_key_value_heads:
        raise ConfigError(f"Model.num_key_value_heads: {m.num_key_value_heads} does not divide "
                          f"Model.num_attention_heads={m.num_attention_heads}")


def _rule_data_files(cfg: Any, devices: int) -> None:
    d = cfg.data
    if d.sft_path is None and (d.prompt_paths or d.eval_paths or d.eft_path):
        field = "Data.prompt_paths" if d.prompt_paths else "Data.eval_paths" if d.eval_paths else "Data.eft_path"
        raise ConfigError(f"{field}: set, but Data.sft_path is None, so the embedded suite would be used and these "
                          "files ignored; set Data.sft_path too")
    if d.sft_path is not None and len(d.prompt_paths) < cfg.iterations:
        raise ConfigError(f"Data.prompt_paths: {len(d.prompt_paths)} files, Run.iterations={cfg.iterations} needs one "
                          "per iteration")


CROSS_RULES: tuple[Callable[[Any, int], None], ...] = (_rule_mesh_and_batches, _rule_heads, _rule_data_files)


def check_config(cfg: Any, devices: int | None = None) -> None:
    """Types, `RULES` and `CROSS_RULES` of a built RunConfig (``devices``: default jax's count)."""
    check_types(cfg)
    check_rules(cfg)
    if devices is None:
        import jax  # noqa: PLC0415

        devices = jax.device_count()
    for rule in CROSS_RULES:
        rule(cfg, devices)


# ---------------------------------------------------------------------------------------------
# Workdir.


def _probe(directory: Path) -> str | None:
    """None if a file can be created in ``directory``, else the reason (works for root too)."""
    probe = directory / f".cream_jax_probe_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return e.strerror or str(e)
    return None


def check_workdir(workdir: str | os.PathLike) -> None:
    """The workdir (and its checkpoints/, models/, logs/ if present) must be writable directories."""
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        raise FilesystemError(f"--workdir {path}: exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise FilesystemError(f"--workdir {path}: {existing} is a file, not a directory")
    for sub in [path] + [path / name for name in ("checkpoints", "models", "logs")]:
        if sub.exists():
            if not sub.is_dir():
                raise FilesystemError(f"--workdir {path}: {sub} is not a directory")
            reason = _probe(sub)
            if reason:
                raise FilesystemError(f"--workdir {path}: {sub} is not writable ({reason})")
    if existing != path:
        reason = _probe(existing)
        if reason:
            raise FilesystemError(f"--workdir {path}: cannot be created in {existing} ({reason})")


# ---------------------------------------------------------------------------------------------
# Model folder and tokenizer.


def check_safetensors(path: str | os.PathLike) -> None:
    """Reads a .safetensors header and checks the file holds every tensor it lists (not truncated)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(f"{path}: truncated ({size} bytes, no safetensors header); re-download or re-export it")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise ModelError(f"{path}: truncated (a {n}-byte header in a {size}-byte file); re-download or re-export it")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ModelError(f"{path}: not a safetensors file (its header is not JSON)") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: not a safetensors file (its header is not a JSON object)")
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    need = 8 + n + max(ends, default=0)
    if need > size:
        raise ModelError(f"{path}: truncated ({size} bytes, its header needs {need}); re-download or re-export it")


def read_model_config(folder: str | os.PathLike) -> dict:
    """Checks an HF checkpoint folder (config.json and every safetensors file) and returns config.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"Model.source={str(folder)!r}: no such folder (a local Hugging Face checkpoint folder, or 'embedded')")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{cfg_path}: missing (the model folder needs config.json)")
    try:
        hf_config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(hf_config, dict):
        raise ModelError(f"{cfg_path}: must be a JSON object")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        value = hf_config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"{cfg_path}: field {key!r} must be a positive integer, got {value!r}")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise ModelError(f"{index}: not valid JSON ({e})") from None
        files = sorted({folder / v for v in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise ModelError(f"{f}: missing (listed in {index.name})")
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{folder}: no *.safetensors weights")
    for f in files:
        check_safetensors(f)
    return hf_config


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of a folder; its failure is one ModelError naming the folder."""
    from cream_jax.models import hf  # noqa: PLC0415 - transformers is heavy

    try:
        return hf.load_tokenizer(str(path))
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad folder
        raise ModelError(f"tokenizer {path}: cannot be loaded ({' '.join(str(e).split())[:300]})") from None


def check_tokenizer(tokenizer: Any, where: str, vocab_size: int | None) -> None:
    """The tokenizer has a chat template (every stage renders chats) and fits the model's vocabulary."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"tokenizer {where}: has no chat template (every prompt and SFT example is a chat); "
                         "add chat_template to tokenizer_config.json or set Model.tokenizer")
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ModelError(f"tokenizer {where}: {len(tokenizer)} tokens do not fit the model's vocab_size={vocab_size} "
                         "(ids past the embedding table); use the model's own tokenizer")
    for name in ("eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None and vocab_size is not None and not 0 <= value < vocab_size:
            raise ModelError(f"tokenizer {where}: {name}={value} is outside the model's vocab_size={vocab_size}")


def _check_gguf(path: Path) -> None:
    if path.suffix.lower() != ".gguf":
        raise ModelError(f"Model.source={str(path)!r}: a file, but not a .gguf one (an HF checkpoint is a folder)")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path}: not a GGUF file (no GGUF magic); re-download it")


def check_model(cfg: Any) -> Any:
    """The model source and tokenizer; returns the tokenizer (None: a GGUF file's own, read later)."""
    m = cfg.model
    if m.source == "embedded":
        from cream_jax.data import tokenizer as tiny_tokenizer  # noqa: PLC0415

        where = m.tokenizer or tiny_tokenizer.EMBEDDED_TOKENIZER_DIR
        tok = load_tokenizer(where)
        check_tokenizer(tok, str(where), None)
        context = m.max_position_embeddings
    elif m.source.startswith("pkg:") or Path(m.source).is_file():  # a GGUF file: its reader checks the tensors
        from cream_jax.models import gguf  # noqa: PLC0415

        try:
            path = Path(gguf.resolve_model_source(m.source))
        except ValueError as e:
            raise ModelError(f"Model.source: {e}") from None
        _check_gguf(path)
        if m.tokenizer is None:
            return None
        where = m.tokenizer
        tok = load_tokenizer(where)
        check_tokenizer(tok, str(where), None)
        context = None
    else:
        hf_config = read_model_config(m.source)
        where = m.tokenizer or m.source
        tok = load_tokenizer(where)
        check_tokenizer(tok, str(where), hf_config["vocab_size"])
        context = hf_config.get("max_position_embeddings")
    longest = max(cfg.data.max_prompt_len + cfg.sampling.max_new_tokens, cfg.sft.max_len,
                  cfg.pretrain.seq_len if m.source == "embedded" else 0, cfg.data.max_prompt_len + cfg.eval.max_new_tokens)
    if isinstance(context, int) and longest > context:
        raise ConfigError(
            f"Data.max_prompt_len: sequences of up to {longest} tokens (Data.max_prompt_len + Sampling.max_new_tokens or "
            f"Eval.max_new_tokens, SFT.max_len, Pretrain.seq_len) exceed the model's context of {context} (max_position_embeddings)")
    return tok


# ---------------------------------------------------------------------------------------------
# Data files.


def check_data(cfg: Any) -> dict:
    """Parses every configured data file with its schema; returns the skipped-row counts."""
    from cream_jax.data import sources  # noqa: PLC0415

    d = cfg.data
    report: dict[str, Any] = {}
    if d.sft_path is None:
        return report
    on_error = d.on_bad_row
    sft = sources.load_sft_chats(d.sft_path, on_error=on_error)
    report["sft"] = {"file": str(d.sft_path), "rows": len(sft.items), "skipped": sft.n_skipped}
    report["prompts"] = {}
    for t, path in enumerate(d.prompt_paths, start=1):
        pool = sources.load_prompt_pool(path, on_error=on_error)
        report["prompts"][str(t)] = {"file": str(path), "rows": len(pool.items), "skipped": pool.n_skipped}
        if t <= cfg.iterations and cfg.method == "dpo_oracle":
            unlabelled = [p["id"] for p in pool.items if p.get("answer") is None]
            if unlabelled:
                raise DataError(f"{path}: prompt {unlabelled[0]!r} has no 'answer' (and {len(unlabelled) - 1} more); "
                                "Run.method='dpo_oracle' rewards with the verifier, which needs every prompt's answer")
    report["eval"] = {}
    for path in d.eval_paths:
        ev = sources.load_eval_set(path, on_error=on_error)
        report["eval"][str(path)] = {"rows": len(ev.items), "skipped": ev.n_skipped}
    if d.eft_path:
        eft = sources.load_judge_examples(d.eft_path, on_error=on_error)
        report["eft"] = {"file": str(d.eft_path), "rows": len(eft.items), "skipped": eft.n_skipped}
    for entry in [report["sft"], *report["prompts"].values(), *report["eval"].values(), *([report["eft"]] if d.eft_path else [])]:
        if entry["skipped"]:
            log.warning("%s: %d bad rows skipped (Data.on_bad_row='skip')", entry.get("file", ""), entry["skipped"])
    return report


def count_inputs(cfg: Any, tokenizer: Any, sft: list, pools: list, tests: dict, report: dict | None = None,
                 sft_added: list | None = None) -> dict:
    """Adds the truncation counts of what the run will encode to ``report`` (from `check_data`).

    ``sft_added``: the method's SFT additions (SRLM's judge training, SCIR's pairwise judge chats).
    Their response comes last, after a long rubric prompt, so a truncated one usually teaches nothing.

    Returns:
      ``{"sft": {rows, skipped, truncated}, "sft_added": {rows, truncated, longest},
      "prompts": {t: {rows, skipped, truncated}}, "eval": {task: {rows, truncated}}, ...}``, every
      count an int; nonzero ones are logged.
    """
    from cream_jax.data import pipeline  # noqa: PLC0415

    report = json.loads(json.dumps(report or {}))
    d = cfg.data
    sft_lengths = pipeline.token_lengths(tokenizer, sft, add_generation_prompt=False)
    sft_entry = report.setdefault("sft", {"rows": len(sft), "skipped": 0})
    sft_entry["rows"] = len(sft)
    sft_entry["truncated"] = sum(n > cfg.sft.max_len for n in sft_lengths)
    if sft_added:
        added_lengths = pipeline.token_lengths(tokenizer, sft_added, add_generation_prompt=False)
        added = report["sft_added"] = {"rows": len(sft_added), "longest": max(added_lengths),
                                       "truncated": sum(n > cfg.sft.max_len for n in added_lengths)}
        if added["truncated"]:
            log.warning("%d of %d SFT examples that %s adds (judge training) are longer than SFT.max_len=%d and "
                        "lose their end, the judgment they teach; SFT.max_len >= %d keeps them whole",
                        added["truncated"], added["rows"], cfg.method, cfg.sft.max_len, added["longest"])
    prompts = report.setdefault("prompts", {})
    for t in range(1, cfg.iterations + 1):
        pool = pools[t - 1] if t - 1 < len(pools) else []
        used = pool[: d.prompts_per_iteration] if d.prompts_per_iteration else pool
        if not used:
            raise DataError(f"the prompt pool of iteration {t} is empty"
                            + (f" ({d.prompt_paths[t - 1]})" if t - 1 < len(d.prompt_paths) else ""))
        lengths = pipeline.token_lengths(tokenizer, [p["messages"] for p in used], add_generation_prompt=True)
        if d.on_overflow == "error":
            over = [(p["id"], n) for p, n in zip(used, lengths) if n > d.max_prompt_len]
            if over:
                raise DataError(f"iteration {t} prompts: prompt {over[0][0]!r} has {over[0][1]} tokens > "
                                f"Data.max_prompt_len={d.max_prompt_len} ({len(over)} such prompts; "
                                "Data.on_overflow='truncate' cuts instead)")
        entry = prompts.setdefault(str(t), {"skipped": 0})
        entry["rows"] = len(used)
        entry["unused"] = len(pool) - len(used)
        entry["truncated"] = sum(n > d.max_prompt_len for n in lengths)
    evals = {}
    for task, items in tests.items():
        used = items[: cfg.eval.num_per_task] if cfg.eval.num_per_task else items
        messages = [x["messages"] if "messages" in x else [{"role": "user", "content": x["question"]}] for x in used]
        lengths = pipeline.token_lengths(tokenizer, messages, add_generation_prompt=True)
        evals[task] = {"rows": len(used), "truncated": sum(n > d.max_prompt_len for n in lengths)}
    report["eval_tasks"] = evals
    for what, entry in [("SFT examples", sft_entry)] + [(f"iteration {t} prompts", e) for t, e in prompts.items()] + \
            [(f"eval {task} questions", e) for task, e in evals.items()]:
        if entry.get("truncated"):
            limit = "SFT.max_len" if what == "SFT examples" else "Data.max_prompt_len"
            log.warning("%d of %d %s are longer than %s and are truncated", entry["truncated"], entry["rows"], what, limit)
    return report


# ---------------------------------------------------------------------------------------------
# Everything, in the order a user would fix it.


def check_run(cfg: Any, workdir: str | os.PathLike, devices: int | None = None) -> dict:
    """Validates the config, the workdir, the data files, the model and the tokenizer.

    Leaves nothing behind (the workdir's write probes are removed). Returns the skipped-row report of the data files (see `count_inputs`).
    """
    check_config(cfg, devices)
    check_workdir(workdir)
    report = check_data(cfg)
    check_model(cfg)
    return report
