"""Run configuration: frozen dataclasses the library takes, and gin at the edge.

The dataclass defaults are the embedded default run (configs/tiny_cpu.gin spells them out; a test
keeps the two equal), so a run needs no gin file at all.

Library code receives the dataclasses below and never imports gin. The CLI (``cream_jax.train``,
``cream_jax.sweep``) calls :func:`parse_gin` which registers every section with gin under a short
name, so a ``.gin`` file or ``--gin_param`` binds fields as ``DPO.beta = 0.05`` or
``Sampling.num_samples = 8``. :func:`build_run_config` then assembles a :class:`RunConfig` whose
sections were constructed with those bindings applied.

Sections and their gin names:
  Model, Suite, Data, Pretrain, SFT, Sampling, Reward (shared by every method), CREAM, SRLM, SeRA,
  SCIR, LengthControl, MetaRewarding (one per method), DPO, Eval, Mesh, Guard, Run
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

@dataclass(frozen=True)
class ModelConfig:
    """Where M0 comes from and, for the embedded default, its shape.

    ``source="embedded"`` builds a tiny LLaMA with the fields below and pretrains it on the
    synthetic corpus (stage M0). Any other value is a local Hugging Face checkpoint folder, a
    ``.gguf`` file, or ``"pkg:PACKAGE/file.gguf"`` (a file inside an installed Python package).
    """

    source: str = "embedded"
    tokenizer: str | None = None  # None: the checkpoint folder, or the embedded tokenizer
    dtype: str = "float32"  # compute dtype (activations, KV cache); logits are always float32
    param_dtype: str = "float32"  # stored (master) weights; the optimizer updates these (MaxText-style)
    export_dtype: str | None = None  # HF export tensors; None: the master weights' dtype
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    remat: bool = False
    remat_policy: str = "full"  # with remat: "full" (keep layer inputs) | "matmuls" (also weight-matmul outputs)


@dataclass(frozen=True)
class DataConfig:
    """Text sources. ``None`` paths use the embedded synthetic suite."""

    sft_path: str | None = None
    # Judge-training (EFT) examples for the methods whose M1 learns to judge (SRLM, SCIR, Meta-Rewarding)
    # when data files replace the built-in suite; schema: cream_jax.data.sources ("judge"), docs/data.md.
    eft_path: str | None = None
    prompt_paths: tuple[str, ...] = ()  # one file per iteration
    eval_paths: tuple[str, ...] = ()
    max_prompt_len: int = 80  # the longest embedded prompt is 65 tokens
    on_overflow: str = "truncate"  # "truncate" (keep the end, counted) | "error"
    on_bad_row: str = "raise"  # "raise" | "skip" (skipped rows are counted)
    prompts_per_iteration: int = 0  # 0: the whole per-iteration split
    suite: str = "embedded"  # without data files: "embedded" (toy tokens) | "natural" (chat prompts, Natural.*)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a cosine schedule and linear warm-up, as in the paper (METHODS 2.4)."""

    learning_rate: float = 1e-3
    end_lr_ratio: float = 0.0  # cosine decays to learning_rate * end_lr_ratio
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    batch_size: int = 32  # global, in examples (pairs for DPO)
    grad_accum: int = 1


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 400
    seq_len: int = 128
    optim: OptimConfig = OptimConfig(learning_rate=3e-3, batch_size=32)


@dataclass(frozen=True)
class SFTConfig:
    epochs: int = 3
    max_len: int = 96
    optim: OptimConfig = OptimConfig(learning_rate=1e-3, batch_size=32)


@dataclass(frozen=True)
class SamplingConfig:
    num_samples: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 32
    batch_size: int = 64  # prompts per generate call
    # Decode layers of the rollout's and the eval's generate calls: "unroll" (L copies of the
    # layer in the program; fastest on small CPU models) or "scan" (one lax.scan over stacked caches:
    # the same tokens, a compile time that does not grow with depth; for deep models).
    layers: str = "unroll"


@dataclass(frozen=True)
class RewardConfig:
    """What every method shares: the implicit reward's reference, how consistency is measured,
    pairing and scoring (METHODS section 0 and 7). Method-specific knobs have their own sections."""

    reward_reference: str = "initial"  # "initial" (M0) | "previous" (M_{t-1})
    consistency_method: str = "kendall"  # "kendall" | "spearman" | "toporder"
    ties: str = "b"  # "b" (tau-b) | "ordinal" (official CREAM code)
    dedup: bool = True  # identical responses are never paired
    score_batch_size: int = 64  # sequences per scoring forward


@dataclass(frozen=True)
class CreamConfig:
    """CREAM (METHODS 2): the soft label of a pair is the consistency C of M_t's and M_{t-1}'s rankings."""

    consistency_level: str = "dyn"  # "dyn" (per prompt) | "avg" (set level, the paper's Algorithm 1)


@dataclass(frozen=True)
class SRLMConfig:
    """SRLM (METHODS 3): M_t judges its own responses."""

    judge_readout: str = "expected"  # "expected" (one forward) | "sample" (K sampled judgments)
    judge_template: str = "additive"  # "additive" (SRLM's rubric) | "compact" (short, for small contexts)
    judge_samples: int = 3  # K for judge_readout="sample"
    max_judgment_tokens: int = 48  # the judgment's budget (justification + "Score: k"); a real model's rubric needs ~150
    # M_{t-1} also judges the rollout, for the reported judge consistency only (it ranks nothing):
    # False skips that pass, half of SRLM's judging time, and reports no consistency.
    report_consistency: bool = True


@dataclass(frozen=True)
class SeRAConfig:
    """SeRA (METHODS 4, [MEM] reconstruction)."""

    ratio: float = 0.5  # fraction of the bootstrapped pairs kept by implicit-reward margin
    ensemble_weight: float = 1.0  # w * r_t + (1 - w) * r_{t-1} ranks the pairs (t >= 2)


@dataclass(frozen=True)
class SCIRConfig:
    """SCIR (METHODS 5, [MEM] reconstruction)."""

    alpha: float = 1.0  # weight of the implicit-vs-generative divergence
    gamma: float = 0.0  # weight of the entropy (confidence) penalty
    divergence: str = "skl"  # "skl" | "bce" | "mse"
    tie_tolerance: float = 1e-3  # |Delta| at or below which the implicit preference is a tie
    eft_pairs: bool = True  # M1 also learns the pairwise judge (pairs built from the EFT examples)


@dataclass(frozen=True)
class LengthControlConfig:
    """Length-controlled reward (methods/length_control.py): the base method's current reward minus
    alpha x response tokens; alpha searched per iteration (sail-sg/dice's sweep) or fixed."""

    base: str = "cream"  # the method whose reward is length-controlled (any registered one)
    alpha: float | None = None  # None: searched each iteration so the pairs' mean length gap is ~0
    alpha_max: float = 1.0  # the search sweeps alpha = 0, alpha_step, ... below alpha_max
    alpha_step: float = 0.001


@dataclass(frozen=True)
class MetaRewardingConfig:
    """Meta-Rewarding (methods/meta_rewarding.py, Wu et al. 2024): M_t judges its responses and
    its own judgments; DPO on actor pairs plus judge pairs."""

    judge_template: str = "additive"  # "additive" | "compact" (as SRLM.judge_template)
    judge_samples: int = 3  # K sampled judgments per response
    score_readout: str = "parsed"  # "parsed" ("Score: k", the paper) | "expected" (sum_k k p(k) after the judgment)
    max_judgment_tokens: int = 48
    max_judge_share: float = 0.5  # cap on judge pairs / all pairs in every train batch, in [0, 0.5]
    eft: bool = True  # M1 also learns to judge (SRLM's EFT examples)


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    epochs: int = 1
    optim: OptimConfig = OptimConfig(learning_rate=1e-4, batch_size=32, weight_decay=0.01)


@dataclass(frozen=True)
class EvalConfig:
    max_new_tokens: int = 32
    batch_size: int = 128
    num_per_task: int = 0  # 0: every test item
    num_logged_samples: int = 4
    m0: bool | None = None  # evaluate M0 before SFT (row "M0", iteration -1); None: unless M0 is the embedded toy


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices left by fsdp * tensor
    fsdp: int = 1
    tensor: int = 1


@dataclass(frozen=True)
class GuardConfig:
    """Sanity limits: cream_jax.validate (before the run) and cream_jax.guards (during training)."""

    warmup_logs: int = 3  # logged steps of a phase before the loss / gradient-norm limits apply
    loss_factor: float = 10.0  # stop when loss > factor * |running median| (and > 1)
    grad_norm_factor: float = 100.0  # stop when the gradient norm > factor * its running median (and > 1)
    param_growth: float = 100.0  # stop when the parameter norm grows by more than this factor in a phase
    allow: tuple[str, ...] = ()  # rule keys whose sanity limit is waived, e.g. ("DPOOptim.learning_rate",)


@dataclass(frozen=True)
class RunConfig:
    method: str = "cream"
    iterations: int = 2
    seed: int = 0
    checkpoint_every: int = 100  # train steps between mid-phase checkpoints
    keep_models_resident: bool = True  # False: M_{t-1}, M0 come from disk just for scoring
    export_hf: bool = False  # save_hf_llama of every iteration's model
    nan_policy: str = "stop"  # "stop": keep the last good checkpoint and exit non-zero
    model: ModelConfig = ModelConfig()
    suite: Any = None  # cream_jax.data.synthetic.SuiteConfig; None = its defaults
    natural: Any = None  # cream_jax.data.natural.NaturalConfig (Data.suite="natural"); None = its defaults
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sft: SFTConfig = SFTConfig()
    sampling: SamplingConfig = SamplingConfig()
    reward: RewardConfig = RewardConfig()
    cream: CreamConfig = CreamConfig()
    srlm: SRLMConfig = SRLMConfig()
    sera: SeRAConfig = SeRAConfig()
    scir: SCIRConfig = SCIRConfig()
    length_control: LengthControlConfig = LengthControlConfig()
    meta_rewarding: MetaRewardingConfig = MetaRewardingConfig()
    dpo: DPOConfig = DPOConfig()
    eval: EvalConfig = EvalConfig()
    mesh: MeshConfig = MeshConfig()
    guard: GuardConfig = GuardConfig()

    def __post_init__(self):
        # Ranges and choices live in one table, cream_jax.validate.RULES (keyed by gin name), which the
        # trainer's up-front check applies too; the method name is checked by methods.create.
        from cream_jax import validate as rules  # noqa: PLC0415 - it imports this module

        rules.check_rules(self, skip=("Run.method",))


def to_dict(cfg: Any) -> Any:
    """JSON-ready nested dict of a config (dataclasses and tuples)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    return cfg


def to_json_dict(cfg: RunConfig) -> dict:
    """``to_dict`` with every value JSON-plain (what run.json and results.json hold)."""
    return json.loads(json.dumps(to_dict(cfg), default=str))


def fingerprint(cfg: RunConfig) -> str:
    """Stable hash of everything that changes results (used to refuse a mismatched workdir)."""
    text = json.dumps(to_dict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# gin, at the edge only.

_SECTIONS = {
    "Model": ("model", ModelConfig),
    "Data": ("data", DataConfig),
    "Pretrain": ("pretrain", PretrainConfig),
    "SFT": ("sft", SFTConfig),
    "Sampling": ("sampling", SamplingConfig),
    "Reward": ("reward", RewardConfig),
    "CREAM": ("cream", CreamConfig),
    "SRLM": ("srlm", SRLMConfig),
    "SeRA": ("sera", SeRAConfig),
    "SCIR": ("scir", SCIRConfig),
    "LengthControl": ("length_control", LengthControlConfig),
    "MetaRewarding": ("meta_rewarding", MetaRewardingConfig),
    "DPO": ("dpo", DPOConfig),
    "Eval": ("eval", EvalConfig),
    "Mesh": ("mesh", MeshConfig),
    "Guard": ("guard", GuardConfig),
}
# Optimizers are nested per stage; each gets its own gin name (PretrainOptim.learning_rate = ...).
_OPTIM_SECTIONS = {"PretrainOptim": "pretrain", "SFTOptim": "sft", "DPOOptim": "dpo"}


def _registered():
    import gin  # noqa: PLC0415 — gin lives at the edge

    from cream_jax.data.natural import NaturalConfig  # noqa: PLC0415
    from cream_jax.data.synthetic import SuiteConfig  # noqa: PLC0415

    if not getattr(_registered, "done", None):
        made = {}
        for name, (_, cls) in _SECTIONS.items():
            made[name] = gin.external_configurable(cls, name=name)
        for name in _OPTIM_SECTIONS:
            made[name] = gin.external_configurable(OptimConfig, name=name)
        made["Suite"] = gin.external_configurable(SuiteConfig, name="Suite")
        made["Natural"] = gin.external_configurable(NaturalConfig, name="Natural")
        made["Run"] = gin.external_configurable(_run_fields, name="Run")
        _registered.done = made
    return _registered.done


def _run_fields(
    method: str = "cream",
    iterations: int = 2,
    seed: int = 0,
    checkpoint_every: int = 100,
    keep_models_resident: bool = True,
    export_hf: bool = False,
    nan_policy: str = "stop",
) -> dict:
    return dict(locals())


def parse_gin(files: list[str] | tuple[str, ...] = (), bindings: list[str] | tuple[str, ...] = ()) -> None:
    """Parses gin files and bindings; errors become one line naming the file or binding."""
    import os  # noqa: PLC0415

    import gin  # noqa: PLC0415

    _registered()
    gin.clear_config()
    for path in files:
        if not os.path.exists(path):
            raise ValueError(f"--gin_file {path}: file not found")
    try:
        gin.parse_config_files_and_bindings(list(files), list(bindings), skip_unknown=False)
    except Exception as e:  # gin raises several types; all are user errors here
        msg = " ".join(str(e).split())
        raise ValueError(f"gin: {msg}") from None


def build_run_config() -> RunConfig:
    """Assembles a RunConfig from the gin bindings currently parsed (defaults elsewhere)."""
    made = _registered()
    sections = {attr: made[name]() for name, (attr, _) in _SECTIONS.items()}
    for optim_name, attr in _OPTIM_SECTIONS.items():
        base = sections[attr]
        optim = made[optim_name](**{f.name: getattr(base.optim, f.name) for f in dataclasses.fields(OptimConfig) if not _is_bound(optim_name, f.name)})
        sections[attr] = dataclasses.replace(base, optim=optim)
    cfg = RunConfig(**made["Run"](), suite=made["Suite"](), natural=made["Natural"](), **sections)
    from cream_jax import methods  # noqa: PLC0415 — the edge: the registry checks the method's own fields

    methods.create(cfg)
    return cfg


def _is_bound(configurable: str, param: str) -> bool:
    import gin  # noqa: PLC0415

    try:
        gin.query_parameter(f"{configurable}.{param}")
        return True
    except ValueError:
        return False


def operative_config_text() -> str:
    import gin  # noqa: PLC0415

    return gin.config_str()
