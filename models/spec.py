"""`ModelSpec`: the shape of a decoder-only Transformer, with its parameter and FLOP counts.

Pure Python: no torch import, so the planner's math and the plan schema can use it.
"""

from __future__ import annotations

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
            raise SpecError(
                f"model.n_head: d_model={self.d_model} is not divisible by n_head={self.n_head}"
            )
        if self.head_dim % 2:
            raise SpecError(f"model.n_head: head size {self.head_dim} must be even for RoPE")
        if self.seq_len > MAX_SEQ_LEN:
            raise SpecError(f"model.seq_len: {self.seq_len} is above the supported maximum {MAX_SEQ_LEN}")
        if self.parametrization not in ("sp", "mup"):
            raise SpecError(f"model.parametrization: must be 'sp' or 'mup', got {self.parametrization!r}")
        for name in ("embedding_multiplier", "init_std", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise SpecError(f"model.{name}: must be a positive number, got {value!r}")

    # --- shape -------------------------------------------------------------------------------------
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
