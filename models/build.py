"""`ModelSpec` -> a Hugging Face causal LM, initialized and grouped for AdamW by oneday.

This module imports torch and transformers; nothing else in the package imports it at module import time
except the runner and the planner's measurement code.

Architecture. A Llama-style decoder (RMSNorm, SwiGLU, RoPE, no biases, multi-head attention with
`num_key_value_heads = n_head`), built with `AutoModelForCausalLM.from_config(..., attn_implementation="sdpa")`
so the result saves with `save_pretrained`, loads with `AutoModelForCausalLM.from_pretrained` and generates:

- standard parametrization (`spec.parametrization == "sp"`, the default): `LlamaConfig` -> `LlamaForCausalLM`;
- μP (`"mup"`, Yang et al. 2022, Tensor Programs V): `GraniteConfig` -> `GraniteForCausalLM`. Granite is a Llama
  with four multipliers; in transformers 5 (`models/granite/modeling_granite.py`) they act as follows:

  * `embedding_multiplier`: the token embeddings are *multiplied* by it before the first block
    (`inputs_embeds * embedding_multiplier`); oneday sets `spec.embedding_multiplier` (a tunable constant,
    1.0 by default; it does not change with width);
  * `attention_multiplier`: *replaces* the 1/sqrt(d_head) softmax scale (it is passed as `scaling=` to the
    SDPA/eager attention function, `q·kᵀ * attention_multiplier`); oneday sets 1/d_head (μP);
  * `residual_multiplier`: each block's attention and MLP branch is *multiplied* by it before the residual
    add; oneday sets 1.0;
  * `logits_scaling`: the LM-head output is *divided* by it (`logits = lm_head(h) / logits_scaling`); oneday
    sets width_mult = d_model / mup_base_width, i.e. the μP output multiplier 1/width_mult.

Initialization (`init_weights`, not HF's defaults): every tensor is drawn on the CPU in fp32 from its own
`torch.Generator`, seeded from `seed` and the tensor's name, so the same spec and seed give bitwise-identical
weights on any device, whatever the global RNG state:

- token embeddings: N(0, init_std) (input weights: constant in width under μP too);
- hidden matrices q, k, v, gate, up: N(0, spec.hidden_init_std()) (init_std under SP;
  init_std/sqrt(width_mult) under μP, i.e. variance ∝ 1/fan_in);
- residual-output projections o_proj, down_proj: N(0, spec.hidden_init_std() / sqrt(2·n_layer)); the extra
  1/sqrt(2L) keeps the residual stream's variance from growing with depth (2L branches add to it; GPT-2,
  Radford et al. 2019, section 2.3; Megatron/OLMo/Llama reference inits do the same);
- RMSNorm weights: 1;
- an untied LM head: N(0, init_std) under SP; **zero** under μP. Tensor Programs V (section D.2/Table 3)
  notes the readout may be zero-initialized and recommends it for transfer: with logits divided by
  width_mult, a random readout would contribute an init-time logit that shrinks like 1/sqrt(width_mult),
  i.e. proxies and the target would start differently; a zero readout makes every width start from the
  uniform distribution (loss = ln(vocab)). The first Adam step then only moves the head (the hidden
  gradients are 0 through a zero head), the rest learns from the second step on. A tied head is the
  embedding matrix and keeps its N(0, init_std) init.

AdamW groups (`param_groups`): see its docstring (Tensor Programs V, Table 3, Adam column).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GraniteConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from oneday.models.spec import ModelSpec

__all__ = ["build_model", "hf_config", "init_weights", "param_groups"]

ATTN_IMPLEMENTATION = "sdpa"

# Linear layers whose output is added to the residual stream (scaled by 1/sqrt(2·n_layer) at init).
_RESIDUAL_OUT = ("o_proj", "down_proj")
_HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hf_config(spec: ModelSpec, *, eos_token_id: int | None = None, bos_token_id: int | None = None) -> PretrainedConfig:
    """The transformers config for `spec`: `LlamaConfig` under SP, `GraniteConfig` (μP multipliers) under μP.

    No biases, `num_key_value_heads = n_head`, SDPA attention, `max_position_embeddings = seq_len`, RoPE
    base from `spec.rope_theta` (transformers 5 takes it as `rope_parameters={"rope_type": "default",
    "rope_theta": ...}`; the v4 top-level `rope_theta`/`rope_scaling` are folded into it). Token ids that
    are not given are left unset (None) rather than at Llama's defaults (1, 2), which mean nothing for a
    tokenizer of our own.
    """
    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.d_model,
        intermediate_size=spec.d_ff,
        num_hidden_layers=spec.n_layer,
        num_attention_heads=spec.n_head,
        num_key_value_heads=spec.n_head,
        hidden_act="silu",
        max_position_embeddings=spec.seq_len,
        initializer_range=spec.init_std,
        rms_norm_eps=1e-6,
        tie_word_embeddings=spec.tied_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(spec.rope_theta)},
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=None,
        use_cache=True,
    )
    if spec.parametrization == "mup":
        config: PretrainedConfig = GraniteConfig(
            **common,
            embedding_multiplier=float(spec.embedding_multiplier),
            attention_multiplier=float(spec.attention_multiplier()),
            residual_multiplier=1.0,
            logits_scaling=float(spec.logits_scaling()),
        )
    else:
        config = LlamaConfig(**common, head_dim=spec.head_dim, pretraining_tp=1)
    config._attn_implementation = ATTN_IMPLEMENTATION
    return config


def build_model(
    spec: ModelSpec,
    *,
    seed: int = 0,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """Build the fp32 model for `spec`, initialized by `init_weights` with `seed`, on `device`.

    The model is constructed and initialized on the CPU (so the weights do not depend on the device) and
    then moved. transformers' own random init is skipped (`transformers.initialization.no_init_weights`;
    oneday overwrites every parameter anyway, and it halves the build time: 135M parameters took 9 s for
    HF's init plus 5 s for ours on 2 cores); where that helper is missing, HF's init runs under
    `torch.random.fork_rng`. Either way building a model leaves the caller's global RNG state untouched.
    """
    config = hf_config(spec, eos_token_id=eos_token_id, bos_token_id=bos_token_id)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # another transformers: let it init (wasted work), then overwrite
        no_init_weights = contextlib.nullcontext
    with torch.random.fork_rng(devices=[]), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.float32)
    if spec.tied_embeddings:
        model.tie_weights()  # no_init_weights also skips the tying that HF's init_weights does
    init_weights(model, spec, seed=seed)
    return model.to(device)


def _named_unique_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """(full name, owning module, attribute name, parameter) for each parameter once (tied ones once)."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            yield (f"{module_name}.{attr}" if module_name else attr), module, attr, param


def _classify(model: PreTrainedModel) -> list[tuple[str, str, nn.Parameter]]:
    """(name, kind, parameter) for every unique parameter; kind in embedding/hidden/residual_out/head/norm.

    Fails loudly on a parameter it does not know, so an architecture change cannot silently leave a tensor
    with HF's init or outside the optimizer's groups.
    """
    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else None
    embed_weight = model.get_input_embeddings().weight
    out: list[tuple[str, str, nn.Parameter]] = []
    for name, module, attr, param in _named_unique_parameters(model):
        short = name.rsplit(".", 2)[-2] if "." in name else name
        if param is embed_weight:
            kind = "embedding"  # also the head when tied
        elif head_weight is not None and param is head_weight:
            kind = "head"
        elif isinstance(module, nn.Linear) and attr == "weight" and short in _HIDDEN:
            kind = "residual_out" if short in _RESIDUAL_OUT else "hidden"
        elif "RMSNorm" in type(module).__name__ and attr == "weight":
            kind = "norm"
        else:
            raise TypeError(f"oneday does not know how to initialize/group parameter {name!r} ({type(module)})")
        out.append((name, kind, param))
    return out


def _tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one tensor from the run's seed and the tensor's name."""
    digest = hashlib.sha256(f"{int(seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def init_weights(model: PreTrainedModel, spec: ModelSpec, *, seed: int) -> None:
    """Initialize every parameter of `model` as oneday's scheme says (module docstring), in place.

    Each tensor is drawn on the CPU in fp32 from its own `torch.Generator`, seeded from `seed` and the
    tensor's name, then copied to the parameter's device and dtype: the result depends on (spec, seed)
    only, not on the global RNG, the device, the order of drawing or the thread count. Tensors are drawn
    in parallel threads (torch releases the GIL while sampling).
    """
    hidden_std = spec.hidden_init_std()
    std_of = {
        "embedding": spec.init_std,
        "head": 0.0 if spec.parametrization == "mup" else spec.init_std,  # μP: zero readout
        "hidden": hidden_std,
        "residual_out": hidden_std / math.sqrt(2 * spec.n_layer),
        "norm": None,
    }

    def init_one(item: tuple[str, str, nn.Parameter]) -> None:
        name, kind, param = item
        std = std_of[kind]
        with torch.no_grad():
            if std is None:
                param.fill_(1.0)
            elif std == 0.0:
                param.zero_()
            else:
                gen = torch.Generator(device="cpu").manual_seed(_tensor_seed(seed, name))
                if param.device.type == "cpu" and param.dtype == torch.float32:
                    param.normal_(0.0, std, generator=gen)
                else:
                    param.copy_(torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))

    items = _classify(model)
    workers = max(1, min(8, os.cpu_count() or 1, len(items)))
    if workers == 1:
        for item in items:
            init_one(item)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(init_one, items))


def param_groups(model: PreTrainedModel, spec: ModelSpec, *, lr: float, weight_decay: float) -> list[dict]:
    """Parameter groups for `torch.optim.AdamW`; every trainable parameter is in exactly one group.

    Each group: `{"params", "lr": lr * lr_scale, "lr_scale", "weight_decay", "name"}` with name one of
    "hidden" (q, k, v, o, gate, up, down), "embedding" (token embeddings; the head too when tied),
    "head" (an untied LM head) and "norm" (RMSNorm weights). Groups with no parameters are left out (no
    "head" group when embeddings are tied). The runner's schedule sets `group["lr"] = lr_t * lr_scale`.

    - SP: lr_scale = 1 everywhere; `weight_decay` on the matrices (hidden, embedding, head), 0 on norms.
    - μP (Tensor Programs V, Table 3, Adam): hidden matrices lr_scale = 1/width_mult; embeddings, norms
      and the head at lr_scale 1 (the head's 1/width_mult is Granite's `logits_scaling`). Weight decay is
      kept independent of the per-group LR: every group's lr·weight_decay (AdamW decays by lr·wd per step)
      equals the base lr·weight_decay, so the hidden group gets weight_decay·width_mult. Norms: no decay.
    """
    wm = spec.width_mult()
    mup = spec.parametrization == "mup"
    settings = {
        "hidden": (1.0 / wm if mup else 1.0, weight_decay * wm if mup else weight_decay),
        "embedding": (1.0, weight_decay),
        "head": (1.0, weight_decay),
        "norm": (1.0, 0.0),
    }
    buckets: dict[str, list[nn.Parameter]] = {name: [] for name in settings}
    for _name, kind, param in _classify(model):
        if not param.requires_grad:
            continue
        buckets["hidden" if kind == "residual_out" else kind].append(param)
    groups = []
    for name, (lr_scale, wd) in settings.items():
        if buckets[name]:
            groups.append(
                {"params": buckets[name], "lr": lr * lr_scale, "lr_scale": lr_scale, "weight_decay": wd, "name": name}
            )
    return groups
