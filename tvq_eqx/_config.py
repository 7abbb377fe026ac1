"""TransformerConfig: every hyperparameter of the model, frozen and validated."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

from pallas_kernels.vq_attention.config import PallasConfig

DType = Literal["float32", "bfloat16", "float16"]
Attention = Literal["vq", "window", "block_window", "full"]
StateKeys = Literal["codewords", "codes"]
# The model's VQ-attention implementations. The op's third one, "quadratic"
# (the dense reference), takes no streaming state, so the model cannot use it.
ImplementationName = Literal["xla", "pallas"]


def check_literals(config: Any) -> None:
    """Raise `ValueError` naming the field and its allowed values when a
    `Literal`-annotated field of the dataclass `config` (plain or `| None`)
    holds anything else.

    The one place every config class checks its `Literal` fields; the allowed
    values are read from the annotations (`typing.get_args`), so they are
    written once, in the field's type.
    """
    cls = type(config)
    for name, allowed in _literal_fields(cls).items():
        value = getattr(config, name)
        # `x in allowed` would accept 1 for True and 1.0 for 1; compare types too.
        if not any(value == a and type(value) is type(a) for a in allowed):
            shown = ", ".join(repr(a) for a in allowed)
            raise ValueError(
                f"{cls.__name__}.{name} must be one of {shown}; got {value!r}"
            )


@functools.cache
def _literal_fields(cls: type) -> dict[str, tuple[Any, ...]]:
    """`{field: allowed values}` for the `Literal` (or `Literal | None`)
    fields of dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        allowed = _literal_values(hints[f.name])
        if allowed is not None:
            out[f.name] = allowed
    return out


def _literal_values(tp: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        parts = [_literal_values(a) for a in typing.get_args(tp)]
        if any(p is not None for p in parts) and all(
            p is not None or a is type(None)
            for p, a in zip(parts, typing.get_args(tp), strict=True)
        ):
            return tuple(
                v
                for p, a in zip(parts, typing.get_args(tp), strict=True)
                for v in (p if p is not None else (None,))
            )
    return None


_INT_FIELDS = (
    "n_vocab",
    "d_model",
    "d_k",
    "d_v",
    "n_head",
    "n_code",
    "n_layer",
    "block_len",
    "mem_len",
    "kv_cache_len",
)
_FLOAT_FIELDS = (
    "p_dropemb",
    "p_dropsin",
    "p_dropres",
    "p_droplyr",
    "c_beta",
    "c_gamma",
    "pe_lam",
    "e_scale",
    "cache_decay",
)
_DTYPE_FIELDS = ("param_dtype", "dtype")


def _normalised(name: str, value: Any) -> Any:
    """`value` of field `name` in its canonical Python form: numpy integers
    and floats as `int` / `float`, dtype objects (`jnp.bfloat16`,
    `np.dtype("float32")`) as their name; anything else unchanged (the
    validation then judges it). Bools stay bools, so they are not taken for
    ints."""
    if name in _INT_FIELDS and isinstance(value, np.integer):
        return int(value)
    if name in _FLOAT_FIELDS and isinstance(value, (np.integer, np.floating)):
        return float(value) if isinstance(value, np.floating) else int(value)
    if name in _DTYPE_FIELDS and not isinstance(value, str):
        try:
            return jnp.dtype(value).name
        except (TypeError, ValueError):
            return value
    return value


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of a Transformer-VQ language model.

    Names follow the official implementation. Parameter arrays do not depend on
    `block_len`, so one set of weights runs at any block length.

    - `n_vocab`, `d_model`, `d_k`, `d_v`, `n_head`, `n_code`, `n_layer`: sizes;
      each layer holds two gated attention units.
    - `block_len`: attention block length; sequences may have any length (a
      partial last block is padded and masked), except with `cache_decay < 1`
      or `attention="block_window"` (whole blocks).
    - `mem_len`: window length M (default `block_len`, any M >= 0, also
      above `block_len`): each block attends directly to the last M keys
      before it plus itself, with the Transformer-XL relative biases for
      distances 0..M; older keys go through the compressive cache.
    - `p_dropemb`, `p_dropsin`, `p_dropres`, `p_droplyr`: dropout on embeddings,
      on the relative-position sinusoids, on each unit's residual, and
      LayerDrop (per attention unit or per layer, see `layerdrop`).
    - `c_beta`: commitment-loss weight; `c_gamma`: codebook EMA rate.
    - `param_dtype`, `dtype`: parameter and activation dtypes (log-probs and
      norms are always float32).
    - `attention`: `"vq"` (default: exact VQ attention with the compressive
      cache), `"window"` (compressive cache off: sliding window over the last
      `mem_len` tokens, the official `agg_cache=0`), `"block_window"` (cache
      off, each block sees the `mem_len` keys before it plus itself: the
      previous + current block at the default `mem_len`), `"full"` (baseline:
      un-quantized causal
      softmax over all keys in a KV cache of the last `kv_cache_len` tokens
      plus the current segment, with the same relative biases).
    - `kv_cache_len`: KV-cache capacity of the `"full"` baseline.
    - `cache_decay`: gamma in (0, 1]; 1 (default, official) is the plain
      cache. Below 1 the compressive cache decays per block (counts and sums
      times gamma), so each cached key weighs `gamma ** (blocks since it left
      the window)` and the log-count bias stays bounded on long streams (a
      remedy for long-context drift; see docs/benchmarks.md). `"vq"` only.
    - `codebook_mode`: `"ema"` (default, official: one codebook per head
      learned across training by the EMA rule) or `"online"` (OVQ-style: a
      dictionary of `n_code` key centroids per sequence and head, built from
      the sequence's own keys as they leave the window and read with
      log-count logits over per-slot value means; the trained codebook is
      then unused). `"online"` needs `attention="vq"`, the xla
      implementation, whole blocks per call, `cache_decay=1`,
      `grad_thru_cache=True`, no `seq_axis` and no packed documents
      (docs/math.md, "Online codebook").
    - `seq_axis`, `batch_axis`: context parallelism. With `seq_axis` set,
      every attention unit splits the sequence over that mesh axis
      (`ops.vq_attention_sharded`: only per-code summaries and one boundary
      block cross devices) and the batch over `batch_axis`; the model must
      then run under `jax.set_mesh(mesh)`. Run-time settings (the CLI's
      `--mesh` sets them); `"vq"` attention with the default
      `grad_thru_cache` and `state_keys` only (docs/parallelism.md).
    - `grad_thru_cache`: gradients pass through the state carried between
      blocks (window keys and values of earlier blocks, cached means); False
      makes it a constant, as the official `grad_thru_cache=False`.
    - `state_keys`: `"codewords"` (official: the carried window keeps the
      codewords of the step that quantized them) or `"codes"` (keeps codes and
      re-reads the current codebook); differs only after a codebook update.
    - `tie_embeddings`: output head shares the token embedding.
    - `abs_pe`: add sinusoidal absolute position embeddings to the input,
      times a learned scalar that starts at 0 (official `pe_abs`, `ScaledSin`).
    - `output_norm`: RMS-normalise (learned gain and bias) before the output
      head (official `e_preln`).
    - `pe_lam`: sinusoid wavelength base (official launch default 1e5).
    - `e_scale`: the logits `x E^T + b` (tied) or `x W + b` (untied) are
      multiplied by it before the log-softmax (official `e_scale`; 0.005 in
      the official PG-19 and ImageNet64 runs).
    - `qk_norm`: `"rms"` (default, official: RMS norm without centring, no
      gain or bias) or `"layer"` (centred layer norm, tvq-eqx's earlier form).
    - `layerdrop`: `"unit"` (default, official: each attention unit's
      residual is dropped on its own, the second unit sees the first unit's
      dropped output) or `"layer"` (one mask per layer for the sum of both
      units' residuals).
    - `drop_mask_scope`: `"sequence"` (default, official "timeless" masks:
      the LayerDrop and sinusoid-dropout masks depend only on the
      `sequence_key` passed to the model, so every update segment of one
      sequence uses the same masks) or `"segment"` (fresh masks every call,
      drawn from `key`).
    - `lm_loss_average`: `"positions"` (default, official: the masked
      negative log-likelihood summed and divided by all `batch * seq`
      positions, padding included) or `"tokens"` (divided by the number of
      unmasked tokens: the per-token mean, unaffected by padding).
    - `implementation`: VQ-attention implementation, `"xla"` or `"pallas"`
      (`None` = best available); the op's dense `"quadratic"` reference
      carries no streaming state, so the model cannot use it.
    - `pallas`: how the Pallas kernels run when they do (`PallasConfig`: tile
      sizes, backward choice, interpret mode); default `PallasConfig()` (None
      is taken as that).
    - `remat`: rematerialisation of the scanned layer body in the backward
      pass (`jax.checkpoint`): `"none"` (default: keep every activation),
      `"full"` (keep only each layer's input, recompute the rest),
      `"dots"` (keep matmul outputs, `checkpoint_policies.dots_saveable`),
      `"dots_no_batch"` (keep matmul outputs without batch dimensions, i.e.
      weight-stationary ones, `dots_with_no_batch_dims_saveable`). Same values and
      gradients, less memory, more compute.
    """

    n_vocab: int = 256
    """Vocabulary size (256 for bytes and images)."""
    d_model: int = 128
    """Width of the residual stream."""
    d_k: int = 32
    """Query/key width per head."""
    d_v: int = 128
    """Value width per head (the gated unit's hidden width)."""
    n_head: int = 1
    """Attention heads per unit."""
    n_code: int = 64
    """Codebook size (codes per head)."""
    n_layer: int = 2
    """Layers; each holds two gated attention units."""
    block_len: int = 64
    """Attention block length L (sequences of any length: a partial last block is padded and masked; whole blocks with cache_decay < 1 or attention=block_window)."""
    mem_len: int | None = None
    """Window M of keys each block attends directly (None = block_len)."""
    p_dropemb: float = 0.0
    """Dropout rate on the token embeddings."""
    p_dropsin: float = 0.0
    """Dropout rate on the relative-position sinusoids."""
    p_dropres: float = 0.0
    """Dropout rate on each unit's residual."""
    p_droplyr: float = 0.0
    """LayerDrop rate (per unit or per layer, see layerdrop)."""
    c_beta: float = 1e-4
    """Commitment-loss weight."""
    c_gamma: float = 0.99
    """Codebook EMA rate."""
    param_dtype: DType = "float32"
    """Parameter dtype."""
    dtype: DType = "float32"
    """Activation dtype (log-probs and norms stay float32)."""
    attention: Attention = "vq"
    """vq (compressive cache), window, block_window or full (KV-cache baseline)."""
    grad_thru_cache: bool = True
    """Gradients flow through the state carried between blocks."""
    tie_embeddings: bool = False
    """Output head shares the token embedding."""
    abs_pe: bool = False
    """Add scaled sinusoidal absolute position embeddings."""
    output_norm: bool = True
    """RMS-normalise before the output head (official e_preln)."""
    pe_lam: float = 100_000.0
    """Sinusoid wavelength base."""
    e_scale: float = 1.0
    """Multiplier on the logits before the log-softmax."""
    qk_norm: Literal["rms", "layer"] = "rms"
    """Query/key norm: rms (official) or layer (centred)."""
    layerdrop: Literal["unit", "layer"] = "unit"
    """LayerDrop granularity: unit (official) or layer."""
    drop_mask_scope: Literal["sequence", "segment"] = "sequence"
    """LayerDrop/sinusoid masks fixed per sequence (official) or per segment."""
    lm_loss_average: Literal["positions", "tokens"] = "positions"
    """Loss divided by all positions (official) or by unmasked tokens."""
    implementation: ImplementationName | None = None
    """VQ-attention implementation (None = best available)."""
    kv_cache_len: int = 2048
    """KV-cache capacity of the full-attention baseline."""
    state_keys: StateKeys = "codewords"
    """Carried window keeps codewords (official) or codes."""
    pallas: PallasConfig | None = PallasConfig()
    """How the Pallas kernels run (tiles, backward, interpret); None = the defaults."""
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    """Rematerialise the scanned layer body: none, full, dots, dots_no_batch."""
    cache_decay: float = 1.0
    """Per-block decay of the compressive cache (1 = none, official)."""
    seq_axis: str | None = None
    """Mesh axis each attention unit splits the sequence over (None: none)."""
    batch_axis: str | None = None
    """Mesh axis the batch is split over, kept split inside the attention."""
    codebook_mode: Literal["ema", "online"] = "ema"
    """Key codebook: ema (official, learned across training) or online (per sequence, OVQ-style)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            canonical = _normalised(f.name, value)
            if canonical is not value:
                object.__setattr__(self, f.name, canonical)
        self._check_sizes()
        self._check_rates()
        self._check_combinations()
        self._check_kinds()

    def _check_number(self, name: str, ok, want: str) -> None:
        """`ValueError` unless field `name` is an int or float (not a bool)
        for which `ok(value)` holds; `want` says what is expected."""
        value = getattr(self, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not ok(value)
        ):
            raise ValueError(f"TransformerConfig.{name} must be {want}; got {value!r}")

    def _check_sizes(self) -> None:
        """Every int field positive, but `mem_len` (0 = no window is valid;
        None = follow `block_len`, resolved here: the model's one home of
        that default)."""
        for name in (n for n in _INT_FIELDS if n != "mem_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"TransformerConfig.{name} must be a positive int; got {value!r}"
                )
        if self.mem_len is None:
            object.__setattr__(self, "mem_len", self.block_len)
        m = self.mem_len
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(
                f"TransformerConfig.mem_len must be a non-negative int; got {m!r}"
            )

    def _check_rates(self) -> None:
        """Probabilities, loss weights, the cache decay and the scales."""
        for name in ("p_dropemb", "p_dropsin", "p_dropres", "p_droplyr"):
            self._check_number(name, lambda p: 0.0 <= p < 1.0, "in [0, 1)")
        self._check_number("c_beta", lambda c: c >= 0, ">= 0")
        self._check_number("c_gamma", lambda c: 0.0 <= c < 1.0, "in [0, 1)")
        self._check_number("cache_decay", lambda g: 0.0 < g <= 1.0, "in (0, 1]")
        self._check_number("pe_lam", lambda lam: lam > 1, "> 1")
        self._check_number("e_scale", lambda e: e > 0, "a float > 0")

    def _check_combinations(self) -> None:
        """Settings that only make sense together."""
        if self.cache_decay != 1.0 and self.attention != "vq":
            raise ValueError(
                f"TransformerConfig.cache_decay={self.cache_decay!r} decays the "
                f"compressive cache, which attention={self.attention!r} does not "
                "have; use attention='vq' or cache_decay=1.0"
            )
        if self.seq_axis is not None and (
            self.attention != "vq"
            or not self.grad_thru_cache
            or self.state_keys != "codewords"
        ):
            raise ValueError(
                f"TransformerConfig.seq_axis={self.seq_axis!r} (context "
                "parallelism) needs attention='vq', grad_thru_cache=True and "
                f"state_keys='codewords'; got attention={self.attention!r}, "
                f"grad_thru_cache={self.grad_thru_cache!r}, "
                f"state_keys={self.state_keys!r}"
            )
        if self.codebook_mode == "online":
            self._check_online()
        if self.implementation == "quadratic":
            raise ValueError(
                "TransformerConfig.implementation must be one of 'xla', 'pallas', "
                "None; got 'quadratic' (the op's dense reference has no streaming "
                "state, which the model carries between blocks and calls)"
            )

    def _check_online(self) -> None:
        """What `codebook_mode="online"` cannot be combined with (yet)."""
        clashes = {
            "attention": (self.attention, "vq"),
            "cache_decay": (self.cache_decay, 1.0),
            "grad_thru_cache": (self.grad_thru_cache, True),
            "seq_axis": (self.seq_axis, None),
        }
        for name, (got, want) in clashes.items():
            if got != want:
                raise ValueError(
                    f"TransformerConfig.codebook_mode='online' needs {name}={want!r}; "
                    f"got {name}={got!r}"
                )
        if self.implementation == "pallas":
            raise ValueError(
                "TransformerConfig.codebook_mode='online' has no Pallas kernels "
                "(they implement the EMA codebook's attention); use "
                "implementation='xla' or None"
            )

    def _check_kinds(self) -> None:
        """`Literal` fields, the pallas settings and the bool switches."""
        check_literals(self)
        if self.pallas is None:  # accepted (earlier run.json files): the defaults
            object.__setattr__(self, "pallas", PallasConfig())
        if not isinstance(self.pallas, PallasConfig):
            raise ValueError(
                f"TransformerConfig.pallas must be a PallasConfig or None; got "
                f"{self.pallas!r}"
            )
        for name in ("grad_thru_cache", "tie_embeddings", "abs_pe", "output_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"TransformerConfig.{name} must be a bool; got {getattr(self, name)!r}"
                )

    def check_masks_documents(self, what: str = "doc_starts") -> None:
        """`ValueError` unless this model can mask packed documents: attention
        `"vq"`, `"window"` or `"block_window"` (the one home of this rule; the
        run config, the train steps and the model call it). `what` names the
        setting that asked (`doc_starts`, `doc_masking`)."""
        if self.codebook_mode == "online":
            raise ValueError(
                f"{what} (packed documents) is not supported with "
                "codebook_mode='online' (the dictionary would have to be reset "
                "at every document start)"
            )
        if self.attention == "full":
            raise ValueError(
                f"{what} (packed documents) needs attention 'vq', 'window' or "
                "'block_window'; attention='full' (the softmax baseline) "
                "cannot mask documents"
            )

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> TransformerConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
