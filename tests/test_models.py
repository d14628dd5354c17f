"""Model builder: counts, configs, init, determinism, save/load/generate, AdamW groups, memory estimate."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, GraniteForCausalLM, LlamaForCausalLM

from oneday.models.build import build_model, hf_config, init_weights, param_groups
from oneday.models.spec import MAX_SEQ_LEN, ModelSpec, SpecError


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> ModelSpec:
    base = ModelSpec(n_layer=2, d_model=64, n_head=4, d_ff=192, vocab_size=512, seq_len=64)
    return replace(base, **overrides)


SHAPES = [
    tiny(),
    tiny(tied_embeddings=True),
    tiny(parametrization="mup", mup_base_width=32),
    tiny(parametrization="mup", mup_base_width=128, tied_embeddings=True, embedding_multiplier=4.0),
    tiny(n_layer=3, d_model=96, n_head=3, d_ff=256, vocab_size=1000, seq_len=16),
    tiny(n_layer=1, d_model=32, n_head=2, d_ff=80, vocab_size=257, parametrization="mup", mup_base_width=16),
]


def _ids(spec):
    return f"{spec.parametrization}-L{spec.n_layer}-d{spec.d_model}-V{spec.vocab_size}-tied{spec.tied_embeddings}"


# --- counts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SHAPES, ids=_ids)
def test_parameter_count_matches_built_model(spec):
    model = build_model(spec)
    unique = {p.data_ptr(): p.numel() for _, p in model.named_parameters(remove_duplicate=False)}
    counted = sum(p.numel() for p in model.parameters())  # each tensor once, as torch counts them
    assert spec.params_total() == counted == sum(unique.values())
    # N for scaling laws: everything but the input embedding, plus the head (tied or not).
    embed = model.get_input_embeddings().weight.numel()
    head = spec.vocab_size * spec.d_model
    assert spec.params_scaling() == counted - embed + (head if spec.tied_embeddings else 0)


def test_flops_per_token_by_hand():
    spec = tiny()  # L=2, d=64, d_ff=192, V=512, T=64
    per_layer = 4 * 64 * 64 + 3 * 64 * 192 + 2 * 64  # attention q,k,v,o + SwiGLU + two RMSNorms = 53376
    n = 2 * per_layer + 64 + 512 * 64  # + final norm + head = 139584
    assert spec.params_scaling() == n == 139584
    assert spec.flops_per_token() == 6 * n + 12 * 2 * 64 * 64 == 935808
    assert tiny(tied_embeddings=True).flops_per_token() == spec.flops_per_token()


# --- config and model type -----------------------------------------------------------------------------
def test_sp_builds_llama_with_sdpa():
    spec = tiny(rope_theta=5000.0)
    config = hf_config(spec, eos_token_id=3, bos_token_id=1)
    assert config.model_type == "llama"
    assert config.num_key_value_heads == config.num_attention_heads == 4
    assert config.head_dim == 16
    assert config.max_position_embeddings == 64
    assert config.rope_parameters["rope_theta"] == 5000.0
    assert config.rope_parameters["rope_type"] == "default"
    assert not config.attention_bias and not config.mlp_bias
    assert config.tie_word_embeddings is False
    assert (config.eos_token_id, config.bos_token_id) == (3, 1)
    model = build_model(spec, eos_token_id=3, bos_token_id=1)
    assert type(model) is LlamaForCausalLM
    assert model.config._attn_implementation == "sdpa"
    assert model.generation_config.eos_token_id == 3
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


def test_mup_builds_granite_with_multipliers():
    spec = tiny(parametrization="mup", mup_base_width=16, embedding_multiplier=10.0, tied_embeddings=True)
    config = hf_config(spec)
    assert config.model_type == "granite"
    assert config.attention_multiplier == pytest.approx(1 / 16)  # 1/d_head, replaces 1/sqrt(d_head)
    assert config.logits_scaling == pytest.approx(4.0)  # logits are divided by width_mult = 64/16
    assert config.embedding_multiplier == 10.0
    assert config.residual_multiplier == 1.0
    assert config.tie_word_embeddings is True
    model = build_model(spec)
    assert type(model) is GraniteForCausalLM
    assert model.config._attn_implementation == "sdpa"
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_granite_multipliers_act_as_documented():
    """Granite with Llama's values is Llama; logits_scaling divides the logits."""
    spec = tiny(parametrization="mup", mup_base_width=64)  # width_mult 1
    granite = build_model(spec, seed=3)
    with torch.no_grad():
        granite.lm_head.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    llama = build_model(replace(spec, parametrization="sp"))
    llama.load_state_dict(granite.state_dict())
    ids = torch.randint(0, spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    granite.config.attention_multiplier = spec.head_dim**-0.5
    for layer in granite.model.layers:
        layer.self_attn.scaling = spec.head_dim**-0.5
    with torch.no_grad():
        reference = llama(input_ids=ids).logits
        torch.testing.assert_close(granite(input_ids=ids).logits, reference)
        granite.config.logits_scaling = 4.0
        torch.testing.assert_close(granite(input_ids=ids).logits, reference / 4.0)


@pytest.mark.parametrize("vocab", [50, 257, 1000])
def test_any_vocab_size(vocab):
    spec = tiny(vocab_size=vocab)
    model = build_model(spec)
    assert model(input_ids=torch.tensor([[0, vocab - 1]])).logits.shape == (1, 2, vocab)


# --- init ------------------------------------------------------------------------------------------
def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("parametrization", ["sp", "mup"])
def test_build_is_deterministic_and_independent_of_global_rng(parametrization):
    spec = tiny(parametrization=parametrization, mup_base_width=32)
    torch.manual_seed(123)
    a = _weights(build_model(spec, seed=7))
    torch.manual_seed(999)
    state = torch.get_rng_state()
    b = _weights(build_model(spec, seed=7))
    assert torch.equal(torch.get_rng_state(), state), "building a model must not consume the global RNG"
    c = _weights(build_model(spec, seed=8))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("parametrization", ["sp", "mup"])
def test_init_scales(parametrization):
    spec = ModelSpec(
        n_layer=4,
        d_model=256,
        n_head=4,
        d_ff=512,
        vocab_size=512,
        seq_len=32,
        parametrization=parametrization,
        mup_base_width=64,
        init_std=0.03,
    )
    model = build_model(spec)
    hidden = spec.hidden_init_std()
    assert hidden == pytest.approx(0.03 / 2 if parametrization == "mup" else 0.03)  # width_mult 4

    def std(t):
        return t.detach().float().std().item()

    assert std(model.model.embed_tokens.weight) == pytest.approx(0.03, rel=0.05)
    for layer in model.model.layers:
        for lin in (
            layer.self_attn.q_proj,
            layer.self_attn.k_proj,
            layer.self_attn.v_proj,
            layer.mlp.gate_proj,
            layer.mlp.up_proj,
        ):
            assert std(lin.weight) == pytest.approx(hidden, rel=0.05)
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
            assert std(lin.weight) == pytest.approx(hidden / math.sqrt(2 * 4), rel=0.05)
        assert torch.all(layer.input_layernorm.weight == 1)
        assert torch.all(layer.post_attention_layernorm.weight == 1)
    assert torch.all(model.model.norm.weight == 1)
    if parametrization == "mup":
        assert torch.all(model.lm_head.weight == 0)  # zero readout under μP
    else:
        assert std(model.lm_head.weight) == pytest.approx(0.03, rel=0.05)


def test_init_weights_reinitializes_in_place():
    spec = tiny()
    model = build_model(spec, seed=1)
    before = _weights(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    init_weights(model, spec, seed=1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- forward, save/load, generate ---------------------------------------------------------------------
@pytest.mark.parametrize("spec", SHAPES[:4], ids=_ids)
def test_forward_loss_near_uniform_at_init(spec):
    model = build_model(spec)
    ids = torch.randint(0, spec.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (3, 20, spec.vocab_size)
    assert torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(math.log(spec.vocab_size), abs=0.1)


@pytest.mark.parametrize(
    "spec", [tiny(), tiny(parametrization="mup", mup_base_width=32, tied_embeddings=True)], ids=_ids
)
def test_save_pretrained_round_trip_and_generate(spec, tmp_path):
    model = build_model(spec, seed=2, eos_token_id=0, bos_token_id=1)
    if spec.parametrization == "mup":  # make the output depend on the (otherwise zero) readout
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    model.eval()
    ids = torch.randint(2, spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded.eval()
    assert type(loaded) is type(model)
    assert (
        loaded.config.to_dict()["logits_scaling" if spec.parametrization == "mup" else "vocab_size"]
        == (model.config.to_dict()["logits_scaling" if spec.parametrization == "mup" else "vocab_size"])
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    out = loaded.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5, pad_token_id=0)
    assert out.shape == (2, 17)


# --- AdamW groups --------------------------------------------------------------------------------------
def _check_cover(model, groups):
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)), "a parameter is in two groups"
    assert set(seen) == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("tied", [False, True])
def test_param_groups_sp(tied):
    spec = tiny(tied_embeddings=tied)
    model = build_model(spec)
    groups = param_groups(model, spec, lr=1e-3, weight_decay=0.1)
    _check_cover(model, groups)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == ({"hidden", "embedding", "norm"} | (set() if tied else {"head"}))
    for g in groups:
        assert g["lr_scale"] == 1.0 and g["lr"] == pytest.approx(1e-3)
        assert g["weight_decay"] == (0.0 if g["name"] == "norm" else 0.1)
    assert len(by_name["hidden"]["params"]) == 7 * spec.n_layer
    assert all(p.ndim == 1 for p in by_name["norm"]["params"])
    torch.optim.AdamW(groups).step()  # AdamW accepts them


@pytest.mark.parametrize("tied", [False, True])
def test_param_groups_mup(tied):
    spec = tiny(parametrization="mup", mup_base_width=16, tied_embeddings=tied)  # width_mult 4
    model = build_model(spec)
    groups = param_groups(model, spec, lr=1e-2, weight_decay=0.1)
    _check_cover(model, groups)
    by_name = {g["name"]: g for g in groups}
    assert ("head" in by_name) is (not tied)
    hidden = by_name["hidden"]
    assert hidden["lr_scale"] == pytest.approx(0.25) and hidden["lr"] == pytest.approx(2.5e-3)
    assert hidden["weight_decay"] == pytest.approx(0.4)
    for name in ("embedding", "norm", *(() if tied else ("head",))):
        assert by_name[name]["lr_scale"] == 1.0 and by_name[name]["lr"] == pytest.approx(1e-2)
    assert by_name["norm"]["weight_decay"] == 0.0
    for g in groups:  # decay per step (lr · wd) is the same in every decayed group
        if g["name"] != "norm":
            assert g["lr"] * g["weight_decay"] == pytest.approx(1e-2 * 0.1)
    torch.optim.AdamW(groups).step()


def test_param_groups_skip_frozen_parameters():
    spec = tiny()
    model = build_model(spec)
    model.model.embed_tokens.weight.requires_grad_(False)
    groups = param_groups(model, spec, lr=1e-3, weight_decay=0.0)
    _check_cover(model, groups)
    assert "embedding" not in {g["name"] for g in groups}


# --- memory estimate -----------------------------------------------------------------------------------
def _measured_peak_bytes(spec: ModelSpec, micro_batch: int) -> int:
    """Peak live CPU bytes of an AdamW step: weights + Adam state + the step's allocation high-water mark."""
    from torch.profiler import ProfilerActivity, profile

    model = build_model(spec)
    opt = torch.optim.AdamW(param_groups(model, spec, lr=1e-3, weight_decay=0.1))
    ids = torch.randint(0, spec.vocab_size, (micro_batch, spec.seq_len))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # creates the Adam moments
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:
        pytest.skip("this torch's profiler exposes no allocation events")
    if not events:
        pytest.skip("the profiler recorded no CPU allocation events")
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    state = sum(p.numel() * p.element_size() for p in model.parameters())
    state += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if v.ndim)
    return state + peak


def test_memory_estimate_close_to_measured_peak():
    spec = ModelSpec(n_layer=2, d_model=128, n_head=4, d_ff=384, vocab_size=1024, seq_len=64)
    measured = _measured_peak_bytes(spec, micro_batch=4)
    estimated = spec.estimate_train_memory_bytes(micro_batch=4)
    assert measured / 2 <= estimated <= measured * 2, (measured, estimated)  # observed 1.15×


def test_memory_estimate_monotone_and_validated():
    spec = tiny()
    base = spec.estimate_train_memory_bytes(micro_batch=4)
    assert spec.estimate_train_memory_bytes(micro_batch=8) > base
    assert spec.estimate_train_memory_bytes(micro_batch=4, activation_bytes=2) < base
    assert spec.estimate_train_memory_bytes(micro_batch=4, param_bytes=2) < base
    for bigger in (tiny(n_layer=3), tiny(d_model=128), tiny(d_ff=384), tiny(vocab_size=1024), tiny(seq_len=128)):
        assert bigger.estimate_train_memory_bytes(micro_batch=4) > base
    # weights + grads + two Adam moments in fp32 = 16 bytes per parameter, plus activations
    assert base > 16 * spec.params_total()
    with pytest.raises(SpecError, match="micro_batch"):
        spec.estimate_train_memory_bytes(micro_batch=0)


# --- invalid specs -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"d_model": 64, "n_head": 5}, "n_head"),
        ({"d_model": 60, "n_head": 4}, "n_head"),  # head size 15 is odd: RoPE needs pairs
        ({"seq_len": MAX_SEQ_LEN + 1}, "seq_len"),
        ({"n_layer": 0}, "n_layer"),
        ({"d_model": -64}, "d_model"),
        ({"d_ff": 0}, "d_ff"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"seq_len": 0}, "seq_len"),
        ({"n_head": 0}, "n_head"),
        ({"mup_base_width": 0}, "mup_base_width"),
        ({"n_layer": 2.0}, "n_layer"),
        ({"n_layer": True}, "n_layer"),
        ({"init_std": 0.0}, "init_std"),
        ({"init_std": float("nan")}, "init_std"),
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"parametrization": "ntk"}, "parametrization"),
        ({"tied_embeddings": "yes"}, "tied_embeddings"),
        ({"embedding_multiplier": 2.0}, "embedding_multiplier"),  # SP (Llama) has none
        ({"parametrization": "mup", "embedding_multiplier": 0.0}, "embedding_multiplier"),
    ],
)
def test_invalid_spec_names_the_field(overrides, field):
    with pytest.raises(SpecError, match=rf"model\.{field}\b"):
        tiny(**overrides)
