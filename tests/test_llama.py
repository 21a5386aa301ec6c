"""cream_jax.models.llama against transformers' PyTorch LlamaForCausalLM, plus invariants."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cream_jax import sharding
from cream_jax.models.hf import load_hf_llama
from cream_jax.models.llama import Llama, LlamaConfig, rope_inv_freq
from tests._tiny_models import TINY_LLAMA, random_batch, random_llama, save_tiny_llama, tiny_hf_config

TOL = 1e-4  # modules, float32 (never relaxed)


@functools.cache
def _jitted_call(graphdef):
    return jax.jit(lambda p, i, k, c: nnx.merge(graphdef, p)(i, k, cache=c))


def forward(model, ids, mask, cache=None):
    """The model's call under jit (eager op-by-op dispatch is slow on 2 shared cores)."""
    graphdef, params = nnx.split(model)
    return _jitted_call(graphdef)(params, jnp.asarray(ids), jnp.asarray(mask), cache)


def hf_logits(hf, ids, mask):
    """transformers logits with positions counted from the first real token, as cream_jax does."""
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos, dtype=torch.long))
    return out.logits.float().numpy()


def mixed_padding_batch(vocab, seed=0):
    """Left-padded rows plus 'left pad + prompt + response + right pad' rows, T=12."""
    ids, mask = random_batch(4, 12, vocab, seed=seed, left_pad=True, min_len=3)
    mask[2] = [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    mask[3] = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    return np.where(mask > 0, ids, 0).astype(np.int32), mask


VARIANTS = {
    "gqa": {},
    "mha": dict(num_key_value_heads=4),
    "llama3_rope": dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=16),
                        rope_theta=500000.0),
    "linear_rope": dict(rope_scaling=dict(rope_type="linear", factor=4.0)),
    "tied_biases": dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "head_dim_32": dict(head_dim=32, num_attention_heads=4, num_key_value_heads=1),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    hf = save_tiny_llama(tmp_path, seed=1, **VARIANTS[variant])
    model, config = load_hf_llama(str(tmp_path))
    ids, mask = mixed_padding_batch(config.vocab_size)
    ours = np.asarray(forward(model, ids, mask))
    ref = hf_logits(hf, ids, mask)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    real = mask > 0
    np.testing.assert_allclose(ours[real], ref[real], atol=TOL, rtol=TOL)
    assert np.isfinite(ours).all()  # padded query rows are garbage but finite


@pytest.mark.parametrize("variant", ["llama3_rope", "linear_rope", "gqa", "head_dim_32"])
def test_rope_inv_freq_matches_transformers(variant):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_cfg = tiny_hf_config(**VARIANTS[variant])
    kind = hf_cfg.rope_parameters["rope_type"]
    fn = LlamaRotaryEmbedding.compute_default_rope_parameters if kind == "default" else ROPE_INIT_FUNCTIONS[kind]
    ref, _ = fn(hf_cfg)
    ours = rope_inv_freq(LlamaConfig.from_hf(hf_cfg))
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6, atol=0)
    if kind != "default":  # the scaling must actually change something for the test to bite
        plain = rope_inv_freq(LlamaConfig.from_hf(tiny_hf_config()))
        assert not np.allclose(ours, plain)


def _tiny_model(seed=0, **kw):
    cfg = LlamaConfig(**{**TINY_LLAMA, **kw})
    return random_llama(cfg, seed), cfg


def test_kv_cache_decode_equals_full_forward():
    model, cfg = _tiny_model()
    ids, mask = random_batch(3, 10, cfg.vocab_size, seed=3, left_pad=True, min_len=4)
    full = np.asarray(forward(model, ids, mask))
    prompt = 6  # prefill 6 slots (left-padded), then decode the remaining 4 one by one
    cache = model.init_cache(3, 10)
    logits, cache = forward(model, ids[:, :prompt], mask[:, :prompt], cache)
    got = [np.asarray(logits)]
    for t in range(prompt, 10):
        logits, cache = forward(model, ids[:, t:t + 1], mask[:, t:t + 1], cache)
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    real = mask > 0
    np.testing.assert_allclose(got[real], full[real], atol=TOL, rtol=TOL)
    assert int(cache.index) == 10
    np.testing.assert_array_equal(np.asarray(cache.mask), mask)


def test_pure_functional_merge_jit_grad_and_remat():
    model, cfg = _tiny_model()
    ids, mask = random_batch(3, 8, cfg.vocab_size, seed=4, left_pad=True)
    mask[2] = 0  # a fully padded row must not poison the gradients with NaN
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, graphdef):
        logits = nnx.merge(graphdef, params)(ids, mask)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 5] * mask)

    grads = jax.jit(jax.grad(loss), static_argnums=1)(params, graphdef)
    model.remat = True
    graphdef_remat, _ = nnx.split(model, nnx.Param)
    grads_remat = jax.jit(jax.grad(loss), static_argnums=1)(params, graphdef_remat)
    for g, gr in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
        assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0
        np.testing.assert_allclose(np.asarray(gr), np.asarray(g), atol=TOL, rtol=TOL)
    assert np.isfinite(np.asarray(forward(model, ids, mask))).all()


def test_forward_jit_does_not_retrace():
    model, cfg = _tiny_model()
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fwd(params, ids, mask):
        return nnx.merge(graphdef, params)(ids, mask)

    for seed in range(3):
        ids, mask = random_batch(2, 8, cfg.vocab_size, seed=seed)
        fwd(params, jnp.asarray(ids), jnp.asarray(mask))


def test_random_init_stacks_distinct_layers_with_logical_names():
    cfg = LlamaConfig(**TINY_LLAMA, attention_bias=True, mlp_bias=True)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    assert sharding.unnamed_params(state) == []
    names = sharding.param_logical_names(state)
    assert names["layers"]["attn"]["wq"] == ("layers", "embed", "heads", "head_dim")
    assert names["layers"]["attn"]["wk"] == ("layers", "embed", "kv_heads", "head_dim")
    assert names["layers"]["mlp"]["w_down"] == ("layers", "mlp", "embed")
    assert names["layers"]["input_norm"] == ("layers", "norm")
    assert names["embed"] == ("vocab", "embed") and names["lm_head"] == ("embed", "vocab")
    wq = np.asarray(state["layers"]["attn"]["wq"][...])
    assert wq.shape == (2, 64, 4, 16)
    assert not np.allclose(wq[0], wq[1])  # each layer got its own key
    assert abs(wq.std() - cfg.initializer_range) < 0.1 * cfg.initializer_range
    np.testing.assert_array_equal(np.asarray(state["layers"]["input_norm"][...]), 1.0)
    np.testing.assert_array_equal(np.asarray(state["layers"]["attn"]["bq"][...]), 0.0)


def test_bfloat16_params_float32_logits():
    model, cfg = _tiny_model(dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    ids, mask = random_batch(2, 6, cfg.vocab_size)
    logits = forward(model, ids, mask)
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_config_from_hf_to_hf_round_trip_and_hashable():
    hf_cfg = tiny_hf_config(**VARIANTS["llama3_rope"], eos_token_id=[2, 5])
    cfg = LlamaConfig.from_hf(hf_cfg)
    assert cfg.eos_token_id == (2, 5) and cfg.eos_ids == (2, 5)
    assert dict(cfg.rope_scaling)["rope_type"] == "llama3" and cfg.rope_theta == 500000.0
    assert LlamaConfig.from_hf(cfg.to_hf()) == cfg
    assert hash(cfg) == hash(LlamaConfig.from_hf(cfg.to_hf()))
    # The pre-v5 config.json form (rope_theta + rope_scaling at top level) reads the same.
    old = {k: v for k, v in cfg.to_hf().items() if k != "rope_parameters"}
    assert LlamaConfig.from_hf(old) == cfg


@pytest.mark.parametrize("change, message", [
    (dict(model_type="mistral"), "model_type 'mistral'"),
    (dict(architectures=["MistralForCausalLM"]), "do not include LlamaForCausalLM"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(rope_parameters=dict(rope_type="yarn", factor=2.0, rope_theta=1e4)), "rope type 'yarn'"),
    (dict(num_key_value_heads=3), "num_key_value_heads=3"),
])
def test_config_errors(change, message):
    d = {**LlamaConfig(**TINY_LLAMA).to_hf(), **change}
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf(d)
    with pytest.raises(ValueError, match="dtype"):
        LlamaConfig(**TINY_LLAMA, dtype="float16")


@pytest.mark.parametrize("variant", ["gqa", "tied_biases"])
def test_decode_step_with_shared_prompt_cache_equals_repeated_kv_cache(variant):
    # R samples per prompt: the prompt cache kept once per prompt + a per-sample cache of new
    # tokens must give the logits of a KVCache holding each prompt R times (GQA, left padding;
    # biases exercise the concatenated qkv / gate-up weights of unstack_layers).
    model, cfg = _tiny_model(seed=2, **VARIANTS[variant])
    R, P, steps = 3, 6, 4
    ids, mask = random_batch(2, P, cfg.vocab_size, seed=5, left_pad=True, min_len=2)
    new = np.random.default_rng(6).integers(3, cfg.vocab_size, size=(2 * R, steps)).astype(np.int32)
    cache = model.init_cache(2 * R, P + steps)
    _, cache = forward(model, np.repeat(ids, R, 0), np.repeat(mask, R, 0), cache)
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params, ids, mask, new):
        m = nnx.merge(graphdef, params)
        _, prefix = m.hidden_states(ids, mask, cache=m.init_cache(2, P))
        gen, layers, out = m.init_gen_cache(2 * R, steps + 2), m.unstack_layers(), []  # spare slots: ignored
        for t in range(steps):
            h, gen = m.decode_step(new[:, t], prefix, gen, jnp.int32(t), layers)
            out.append(m.logits(h))
        return jnp.stack(out, 1)

    got = np.asarray(run(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(new)))
    ones = np.ones((2 * R, 1), np.int32)
    for t in range(steps):
        logits, cache = forward(model, new[:, t:t + 1], ones, cache)
        np.testing.assert_allclose(got[:, t], np.asarray(logits)[:, 0], atol=TOL, rtol=TOL)
