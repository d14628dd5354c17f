"""`ModelSpec`: the shape of a decoder-only Transformer, with its parameter and FLOP counts.

Pure Python: no torch import, so the planner's math and the plan schema can use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from oneday.errors import UserError

Parametrization = Literal["sp", "mup"]

# Llama/Granite with RoPE have no learned position table; longer contexts than this are outside what
# these tiny-to-medium single-machine runs are planned for and what the RoPE base below extrapolates to.
MAX_SEQ_LEN = 32768


class SpecError(UserError):
    """A spec field holds an impossible value; the message names the field."""


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-style decoder (RMSNorm, SwiGLU, RoPE, no biases) and its parametrization.

    `parametrization="mup"` turns on μP (Yang et al. 2022, Tensor Programs V) relative to
    `mup_base_width`; the model is then built as a Granite model, which carries the multipliers.
    With `"sp"` (standard parametrization) it is built as a Llama model.
    """

    n_layer: int
    d_model: int
    n_head: int
    d_ff: int
    vocab_size: int
    seq_len: int
    tied_embeddings: bool = False
    parametrization: Parametrization = "sp"
    mup_base_width: int = 256
    embedding_multiplier: float = 1.0
    init_std: float = 0.02
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("n_layer", "d_model", "n_head", "d_ff", "vocab_size", "seq_len", "mup_base_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SpecError(f"model.{name}: must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise SpecError(f"model.n_head: d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.head_dim % 2:
            raise SpecError(f"model.n_head: head size {self.head_dim} must be even for RoPE")
        if self.seq_len > MAX_SEQ_LEN:
            raise SpecError(f"model.seq_len: {self.seq_len} is above the supported maximum {MAX_SEQ_LEN}")
        if self.parametrization not in ("sp", "mup"):
            raise SpecError(f"model.parametrization: must be 'sp' or 'mup', got {self.parametrization!r}")
        for name in ("embedding_multiplier", "init_std", "rope_theta"):
            value = getattr(self, name)
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not value > 0
                or not math.isfinite(value)
            ):
                raise SpecError(f"model.{name}: must be a positive number, got {value!r}")
        if not isinstance(self.tied_embeddings, bool):
            raise SpecError(f"model.tied_embeddings: must be true or false, got {self.tied_embeddings!r}")
        if self.parametrization == "sp" and self.embedding_multiplier != 1.0:
            # A Llama model has no embedding multiplier; silently dropping it would train another model.
            raise SpecError(
                f"model.embedding_multiplier: only μP (parametrization='mup') has one; must be 1.0 under "
                f"'sp', got {self.embedding_multiplier!r}"
            )

    # --- shape -------------------------------------------------------------------------------------
    def label(self) -> str:
        """`layers×width`, e.g. `12×768`: how tables and messages name a shape."""
        return f"{self.n_layer}×{self.d_model}"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def family(self) -> str:
        """The transformers model type this spec is built as."""
        return "granite" if self.parametrization == "mup" else "llama"

    # --- μP multipliers (Tensor Programs V, Table 3; Granite's config names) ------------------------
    def width_mult(self) -> float:
        """d_model / base width under μP; 1 under standard parametrization."""
        return self.d_model / self.mup_base_width if self.parametrization == "mup" else 1.0

    def attention_multiplier(self) -> float:
        """Scale of q·k: 1/d_head under μP, 1/sqrt(d_head) under standard parametrization."""
        return 1.0 / self.head_dim if self.parametrization == "mup" else self.head_dim**-0.5

    def logits_scaling(self) -> float:
        """Granite divides the output logits by this: width_mult under μP."""
        return self.width_mult()

    def hidden_init_std(self) -> float:
        """Init std of hidden matrices: `init_std / sqrt(width_mult)` under μP."""
        return self.init_std / self.width_mult() ** 0.5

    # --- counts ------------------------------------------------------------------------------------
    def params_per_layer(self) -> int:
        """q, k, v, o (d×d each), SwiGLU gate/up/down (3·d·d_ff), two RMSNorm weights."""
        d = self.d_model
        return 4 * d * d + 3 * d * self.d_ff + 2 * d

    def params_total(self) -> int:
        """Every parameter of the built model (a tied head is counted once)."""
        embeddings = self.vocab_size * self.d_model
        head = 0 if self.tied_embeddings else embeddings
        return embeddings + head + self.n_layer * self.params_per_layer() + self.d_model

    def params_scaling(self) -> int:
        """N for scaling laws: non-embedding parameters plus the LM head.

        Counting the head but not the input embedding follows Pearce & Song (2024) and Porian et al.
        (2024), whose reconciliation of the Kaplan and Chinchilla laws hinges on this choice. The head
        counts whether or not it is tied: it costs the same FLOPs.
        """
        return self.n_layer * self.params_per_layer() + self.d_model + self.vocab_size * self.d_model

    def flops_per_token(self) -> float:
        """Training FLOPs per token, 6N + 12·L·d·T (PaLM, Chowdhery et al. 2022, appendix B)."""
        return 6.0 * self.params_scaling() + 12.0 * self.n_layer * self.d_model * self.seq_len

    # --- memory --------------------------------------------------------------------------------------
    def estimate_train_memory_bytes(self, *, micro_batch: int, param_bytes: int = 4, activation_bytes: int = 4) -> int:
        """Estimated peak memory of one AdamW training step (forward, backward, optimizer step), in bytes.

        state       = 4 · P · param_bytes   weights, gradients and AdamW's two moments (torch keeps the
                                            moments in the parameter's dtype); P = params_total()
        activations = micro_batch · seq_len · (activation_bytes · (L·(10·d + 4·d_ff) + 3·d) + 16·V)

        Per token and layer the backward pass keeps ≈10·d values (RMSNorm inputs/outputs, q, k, v after
        RoPE, the attention output, the o_proj input) and 4·d_ff (gate, up, silu(gate), their product);
        3·d outside the layers (embedding output, final norm). The logits cost ≈16 bytes per element
        whatever the precision: the fp32 logits (the HF loss upcasts them), the saved log-softmax, and
        in the backward their two gradients. Attention is assumed to be SDPA with a fused kernel (flash /
        memory-efficient on CUDA, the flash kernel on CPU): no seq_len² term. Not included: the CUDA
        context and allocator caching/fragmentation, torch.compile workspaces, data batches.

        Calibration (fp32 on CPU, torch 2.13, peak live bytes from the profiler's allocation events, i.e.
        weights + Adam state + the step's peak; cross-checked with the process's peak RSS, 418 MB vs 391 MB
        for the first shape). The constants 10, 4, 3 and 16 were fitted from the first shape and from
        changing L, d, d_ff, V and T one at a time (seq_len 512 doubled the activations exactly: no T²):

            L  d    d_ff  V     T    B   measured   estimated
            4  256  768   4096  256  8   391 MB     413 MB  (1.06×)
            8  256  768   4096  256  8   617 MB     652 MB  (1.06×)
            4  256  768   4096  512  8   717 MB     738 MB  (1.03×)
            6  384  1024  8192  256  4   537 MB     605 MB  (1.13×)
            2  128  384   1024  64   4   18.6 MB    21.4 MB (1.15×)

        The estimate is slightly high because the peak falls at the start of the backward pass, before
        most gradients exist; the planner should still keep a margin for what is not included.
        """
        if not isinstance(micro_batch, int) or isinstance(micro_batch, bool) or micro_batch <= 0:
            raise SpecError(f"train.micro_batch: must be a positive integer, got {micro_batch!r}")
        state = 4 * self.params_total() * param_bytes
        per_token = (
            activation_bytes * (self.n_layer * (10 * self.d_model + 4 * self.d_ff) + 3 * self.d_model)
            + 16 * self.vocab_size
        )
        return int(state + micro_batch * self.seq_len * per_token)
