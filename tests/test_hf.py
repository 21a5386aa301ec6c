"""cream_jax.models.hf: safetensors load/save against transformers, and its one-line errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from cream_jax.models.hf import load_hf_llama, load_tokenizer, save_hf_llama
from cream_jax.models.llama import LlamaConfig
from tests._tiny_models import (CHAT_TEMPLATE, TINY_LLAMA, random_batch, random_llama, save_tiny_llama,
                                save_tiny_tokenizer)
from tests.test_llama import forward, hf_logits, mixed_padding_batch

TOL = 1e-4


def _params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf = save_tiny_llama(path, seed=2)
    return str(path), hf


def test_save_loads_in_transformers_with_same_logits(tmp_path):
    rope = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8)
    cfg = LlamaConfig(**{**TINY_LLAMA, "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True,
                         "rope_scaling": rope, "eos_token_id": (2, 5)})
    # Random biases and norm scales, so that a mis-mapped one cannot hide behind zeros and ones.
    model = random_llama(cfg, seed=0)
    save_hf_llama(model, cfg, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert hf.config.tie_word_embeddings and list(hf.config.eos_token_id) == [2, 5]
    assert hf.config.rope_parameters["rope_type"] == "llama3"
    ids, mask = mixed_padding_batch(cfg.vocab_size, seed=5)
    real = mask > 0
    np.testing.assert_allclose(np.asarray(forward(model, ids, mask))[real], hf_logits(hf, ids, mask)[real],
                               atol=TOL, rtol=TOL)


def test_round_trip_load_save_load(tiny_ckpt, tmp_path):
    path, _ = tiny_ckpt
    model, cfg = load_hf_llama(path)
    save_hf_llama(model, cfg, str(tmp_path))
    again, cfg2 = load_hf_llama(str(tmp_path))
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, _params(again), _params(model))
    # Tensor by tensor, the re-saved file equals the transformers original.
    ref = load_file(os.path.join(path, "model.safetensors"))
    out = load_file(os.path.join(str(tmp_path), "model.safetensors"))
    assert sorted(ref) == sorted(out)
    for name in ref:
        np.testing.assert_array_equal(out[name], ref[name], err_msg=name)


def test_sharded_checkpoints_load_and_save(tmp_path):
    hf = save_tiny_llama(tmp_path / "hf", seed=3, max_shard_size="40KB")
    files = os.listdir(tmp_path / "hf")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    model, cfg = load_hf_llama(str(tmp_path / "hf"))
    ids, mask = mixed_padding_batch(cfg.vocab_size, seed=6)
    real = mask > 0
    ours = np.asarray(forward(model, ids, mask))
    np.testing.assert_allclose(ours[real], hf_logits(hf, ids, mask)[real], atol=TOL, rtol=TOL)
    save_hf_llama(model, cfg, str(tmp_path / "ours"), max_shard_bytes=50_000)
    index = json.load(open(tmp_path / "ours" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 2
    hf2 = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "ours"), attn_implementation="eager").eval()
    np.testing.assert_allclose(hf_logits(hf2, ids, mask)[real], ours[real], atol=TOL, rtol=TOL)


def test_bf16_checkpoint(tmp_path):
    hf = save_tiny_llama(tmp_path, seed=4, dtype="bfloat16")
    ids, mask = random_batch(2, 8, TINY_LLAMA["vocab_size"], seed=7)
    real = mask > 0
    # Loaded as float32 the bf16 weights are exact, so float32 tolerance holds against transformers
    # loading the same file as float32.
    m32, _ = load_hf_llama(str(tmp_path), dtype=jnp.float32)
    hf32 = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                         attn_implementation="eager").eval()
    ref32 = hf_logits(hf32, ids, mask)
    np.testing.assert_allclose(np.asarray(forward(m32, ids, mask))[real], ref32[real], atol=TOL, rtol=TOL)
    # Loaded as bf16: bf16 params and activations, float32 logits, close at bf16 precision.
    m16, cfg16 = load_hf_llama(str(tmp_path), dtype=jnp.bfloat16)
    assert cfg16.dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(m16, nnx.Param)))
    ours16 = np.asarray(forward(m16, ids, mask))
    assert ours16.dtype == np.float32
    scale = np.abs(ref32[real]).max()
    err = np.abs(ours16[real] - ref32[real]).max()
    assert err < 0.05 * scale, (err, scale)
    # bf16 save keeps bf16 tensors that transformers reads back exactly.
    save_hf_llama(m16, cfg16, str(tmp_path / "out"))
    hf16 = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert hf16.dtype == torch.bfloat16
    for (name, p), (_, q) in zip(sorted(hf.state_dict().items()), sorted(hf16.state_dict().items())):
        assert torch.equal(p, q), name


def test_fp32_master_load_with_bf16_compute_and_export_dtype(tmp_path, tiny_ckpt):
    path, hf = tiny_ckpt
    ids, mask = random_batch(2, 8, TINY_LLAMA["vocab_size"], seed=9)
    real = mask > 0
    mixed, cfg = load_hf_llama(path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "float32")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(mixed, nnx.Param)))
    m16, _ = load_hf_llama(path, dtype=jnp.bfloat16)
    # The forward casts the float32 masters to bf16 per layer: the logits of bf16 params exactly.
    np.testing.assert_array_equal(np.asarray(forward(mixed, ids, mask))[real], np.asarray(forward(m16, ids, mask))[real])
    # Export: the masters' dtype by default (exact float32 values), or the dtype asked for.
    save_hf_llama(mixed, cfg, str(tmp_path / "master"))
    saved = load_file(str(tmp_path / "master" / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {np.dtype(np.float32)}
    for name, p in hf.state_dict().items():
        np.testing.assert_array_equal(saved[name], p.numpy(), err_msg=name)
    assert json.load(open(tmp_path / "master" / "config.json"))["torch_dtype"] == "float32"
    save_hf_llama(mixed, cfg, str(tmp_path / "half"), dtype=jnp.bfloat16)
    hf16 = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "half"))
    assert hf16.dtype == torch.bfloat16
    for name, p in hf.state_dict().items():
        assert torch.equal(hf16.state_dict()[name], p.to(torch.bfloat16)), name


def test_load_tokenizer_keeps_chat_template(tmp_path):
    save_tiny_tokenizer(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True, tokenize=False)
    assert text == "<s><|user|>2+2?</s><|assistant|>"
    assert tok.decode(tok("ab c\n").input_ids) == "ab c\n"
    with pytest.raises(ValueError, match="no such folder"):
        load_tokenizer(str(tmp_path / "nope"))


def _copy_ckpt(src, dst):
    os.makedirs(dst)
    for f in os.listdir(src):
        with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
            b.write(a.read())
    return dst


def test_errors(tiny_ckpt, tmp_path):
    path, _ = tiny_ckpt
    with pytest.raises(ValueError, match=r"nope: no such folder"):
        load_hf_llama(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: missing config.json"):
        load_hf_llama(str(tmp_path / "empty"))

    other = _copy_ckpt(path, str(tmp_path / "mistral"))
    cfg = json.load(open(os.path.join(other, "config.json")))
    json.dump({**cfg, "model_type": "mistral", "architectures": ["MistralForCausalLM"]},
              open(os.path.join(other, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"mistral/config.json: .*model_type 'mistral'"):
        load_hf_llama(other)

    missing = _copy_ckpt(path, str(tmp_path / "missing"))
    tensors = load_file(os.path.join(missing, "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"], tensors["lm_head.weight"]
    save_file(tensors, os.path.join(missing, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight', 'lm_head.weight'\]"):
        load_hf_llama(missing)

    shape = _copy_ckpt(path, str(tmp_path / "shape"))
    json.dump({**cfg, "intermediate_size": 96}, open(os.path.join(shape, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.gate_proj.weight has shape \(128, 64\), expected \(96, 64\)"):
        load_hf_llama(shape)

    pickle = tmp_path / "pickle"
    pickle.mkdir()
    json.dump(cfg, open(pickle / "config.json", "w"))
    (pickle / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickle checkpoints are not loaded; convert to safetensors"):
        load_hf_llama(str(pickle))
    os.remove(pickle / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \*.safetensors weights found"):
        load_hf_llama(str(pickle))
    with pytest.raises(ValueError, match="dtype must be float32 or bfloat16"):
        load_hf_llama(path, dtype=jnp.float16)


def test_export_with_tokenizer_is_a_complete_model_source(tiny_ckpt, tmp_path):
    """save_hf_llama(..., tokenizer=) writes the tokenizer and chat template beside the weights."""
    path, hf = tiny_ckpt
    model, cfg = load_hf_llama(path)
    tok = save_tiny_tokenizer(tmp_path / "tok")
    out = str(tmp_path / "export")
    save_hf_llama(model, cfg, out)
    with pytest.raises(ValueError, match="export: no tokenizer files"):
        load_tokenizer(out)  # weights alone are not a model source
    save_hf_llama(model, cfg, out, tokenizer=tok)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    for again in (load_tokenizer(out), transformers.AutoTokenizer.from_pretrained(out)):
        assert again.chat_template == CHAT_TEMPLATE
        assert again.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)
        assert again("a b").input_ids == tok("a b").input_ids
    hf2 = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids, mask = random_batch(2, 9, cfg.vocab_size, seed=1)
    np.testing.assert_allclose(hf_logits(hf2, ids, mask)[mask > 0], hf_logits(hf, ids, mask)[mask > 0], atol=TOL)
