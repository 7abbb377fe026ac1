"""Run configurations and the named presets (tiny, enwik8, pg19, imagenet64)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from .._config import TransformerConfig
from ._optimizer import OPTIMIZERS, OptimizerConfig

DataKind = Literal["bytes", "sentencepiece", "images"]
DATA_KINDS = ("bytes", "sentencepiece", "images")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a `train` run needs besides the model config.

    Steps count *optimizer updates* (as the official `n_max_step`): each batch
    of `seq_len` tokens per row gives `seq_len // update_len` updates, so
    `steps` must be a multiple of that.

    - `data`: path (file or folder) or `None` for the bundled Shakespeare
      corpus; `data_kind`: `"bytes"` (byte-level text, 90/5/5 split or the
      enwik8 split), `"sentencepiece"` (a folder of text documents and a
      `tokenizer` model file, documents split 90/5/5), `"images"` (a folder of
      images as 64x64 RGB byte sequences, images split 90/5/5).
    - `batch_size` (global, split over devices), `seq_len`, `update_len`.
    - optimizer: `optimizer`, `learning_rate`, `warmup_steps`, `steps`,
      `weight_decay`, `grad_clip` (`None` = off), `final_lr_ratio`.
    - `eval_every` (updates; 0 = only at the end), `eval_batches` (0 = the
      whole validation split), `log_every`, `save_every` (0 = only at the
      end), `keep` (checkpoints kept).
    - sampling at the end: `sample_len`, `temperature`, `top_p`.
    - `seed`: parameters, dropout and data order.
    - `context_len`: tokens of history each row's attention state carries
      before it is emptied, in training and evaluation (a multiple of
      `seq_len`); 0 = never within an epoch. The official recipe trains and
      evaluates on independent sequences (`context_len = seq_len`). Unbounded
      carried history at small budgets hurts: the per-code counts of a long
      cache outweigh the bounded query-key scores before the model learns to
      use them (see docs/benchmarks.md).
    """

    model: TransformerConfig
    data: str | None = None
    data_kind: str = "bytes"
    tokenizer: str | None = None
    batch_size: int = 8
    seq_len: int = 256
    update_len: int = 256
    optimizer: str = "adamw"
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    steps: int = 400
    weight_decay: float = 2e-4
    grad_clip: float | None = 1.0
    final_lr_ratio: float = 0.1
    eval_every: int = 100
    eval_batches: int = 0
    log_every: int = 10
    save_every: int = 0
    keep: int = 3
    sample_len: int = 400
    temperature: float = 1.0
    top_p: float = 0.9
    seed: int = 0
    context_len: int = 0

    def __post_init__(self):
        if not isinstance(self.model, TransformerConfig):
            raise TypeError("RunConfig.model must be a TransformerConfig")
        ints = ("batch_size", "seq_len", "update_len", "steps", "log_every", "keep")
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        for name in (
            "warmup_steps",
            "eval_every",
            "eval_batches",
            "save_every",
            "sample_len",
            "seed",
            "context_len",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0; got {v!r}")
        bl = self.model.block_len
        if self.update_len % bl != 0:
            raise ValueError(
                f"update_len={self.update_len} must be a multiple of block_len={bl}"
            )
        if self.seq_len % self.update_len != 0:
            raise ValueError(
                f"seq_len={self.seq_len} must be a multiple of block_len={bl} x "
                f"update segments (update_len={self.update_len})"
            )
        if self.steps % self.updates_per_batch != 0:
            raise ValueError(
                f"steps={self.steps} (optimizer updates) must be a multiple of "
                f"seq_len / update_len = {self.updates_per_batch}"
            )
        if self.context_len % self.seq_len != 0:
            raise ValueError(
                f"context_len={self.context_len} must be a multiple of "
                f"seq_len={self.seq_len} (or 0 = carry the state through the epoch)"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}"
            )
        if self.data_kind not in DATA_KINDS:
            raise ValueError(
                f"data_kind must be one of {DATA_KINDS}; got {self.data_kind!r}"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0; got {self.learning_rate!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or none; got {self.grad_clip!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p!r}")

    def resets_state(self, window: int) -> bool:
        """Whether the carried attention state is emptied before window `window`
        (the index of a batch within its epoch / evaluation pass)."""
        if window == 0:
            return True
        return self.context_len > 0 and (window * self.seq_len) % self.context_len == 0

    @property
    def updates_per_batch(self) -> int:
        return self.seq_len // self.update_len

    @property
    def total_batches(self) -> int:
        return self.steps // self.updates_per_batch

    def optimizer_config(self) -> OptimizerConfig:
        return OptimizerConfig(
            name=self.optimizer,
            learning_rate=self.learning_rate,
            warmup_steps=self.warmup_steps,
            total_steps=self.steps,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            final_lr_ratio=self.final_lr_ratio,
        )

    def replace(self, **changes) -> RunConfig:
        """A copy with some run fields or model fields changed (validated).

        Changing `block_len` alone moves `mem_len` with it when they were
        equal."""
        model_fields = {f.name for f in dataclasses.fields(TransformerConfig)}
        m = {k: v for k, v in changes.items() if k in model_fields}
        r = {k: v for k, v in changes.items() if k not in model_fields}
        if (
            "block_len" in m
            and "mem_len" not in m
            and self.model.mem_len == self.model.block_len
        ):
            m["mem_len"] = None  # mem_len followed block_len: keep following it
        model = self.model.replace(**m) if m else self.model
        return dataclasses.replace(self, model=model, **r)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = dataclasses.asdict(self.model)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d)
        model = TransformerConfig(**d.pop("model"))
        return cls(model=model, **d)


def _official(
    *,
    n_vocab,
    d_model,
    d_v,
    n_layer,
    seq_len,
    update_len,
    abs_pe,
    p_dropsin,
    p_dropres,
    p_droplyr,
    tie,
    preln,
    optimizer,
    lr,
    wd,
    clip,
    steps,
    top_p,
    data_kind,
    batch_size,
) -> RunConfig:
    model = TransformerConfig(
        n_vocab=n_vocab,
        d_model=d_model,
        d_k=128,
        d_v=d_v,
        n_head=1,
        n_code=512,
        n_layer=n_layer,
        block_len=512,
        mem_len=512,
        p_dropemb=0.0,
        p_dropsin=p_dropsin,
        p_dropres=p_dropres,
        p_droplyr=p_droplyr,
        c_beta=1e-4,
        c_gamma=0.99,
        param_dtype="float32",
        dtype="bfloat16",
        tie_embeddings=tie,
        output_norm=preln,
        abs_pe=abs_pe,
        pe_lam=100_000.0,
    )
    return RunConfig(
        model=model,
        data_kind=data_kind,
        batch_size=batch_size,
        seq_len=seq_len,
        update_len=update_len,
        optimizer=optimizer,
        learning_rate=lr,
        warmup_steps=10_000,
        steps=steps,
        weight_decay=wd,
        grad_clip=clip,
        final_lr_ratio=0.1,
        eval_every=1_000,
        eval_batches=100,
        log_every=100,
        save_every=1_000,
        keep=5,
        sample_len=8192,
        temperature=1.0,
        top_p=top_p,
        seed=42,
        context_len=seq_len,  # independent sequences, as the official loop
    )


PRESETS: dict[str, RunConfig] = {
    # CPU demo on the bundled Shakespeare corpus: ~2 CPU cores, a few minutes.
    "tiny": RunConfig(
        model=TransformerConfig(
            n_vocab=256,
            d_model=128,
            d_k=32,
            d_v=128,
            n_head=1,
            n_code=64,
            n_layer=2,
            block_len=64,
        ),
        batch_size=8,
        seq_len=256,
        update_len=256,
        optimizer="adamw",
        learning_rate=3e-3,
        warmup_steps=20,
        steps=600,
        weight_decay=2e-4,
        grad_clip=1.0,
        eval_every=150,
        eval_batches=0,
        log_every=10,
        save_every=0,
        keep=2,
        sample_len=400,
        temperature=0.8,
        top_p=0.9,
        seed=0,
        # Carry the attention state over 4 consecutive batches (1,024 bytes of
        # history per row), then start empty: 2.50 val bits/byte vs 2.78 when
        # the state is carried through the whole epoch (docs/benchmarks.md).
        context_len=1024,
    ),
    "enwik8": _official(
        n_vocab=256,
        d_model=768,
        d_v=1536,
        n_layer=24,
        seq_len=8192,
        update_len=2048,
        abs_pe=False,
        p_dropsin=0.2,
        p_dropres=0.5,
        p_droplyr=0.3,
        tie=False,
        preln=False,
        optimizer="adamw",
        lr=4e-4,
        wd=2e-4,
        clip=0.1,
        steps=125_000,
        top_p=0.9,
        data_kind="bytes",
        batch_size=128,
    ),
    "pg19": _official(
        n_vocab=32_000,
        d_model=2048,
        d_v=4096,
        n_layer=24,
        seq_len=8192,
        update_len=2048,
        abs_pe=False,
        p_dropsin=0.1,
        p_dropres=0.1,
        p_droplyr=0.1,
        tie=True,
        preln=True,
        optimizer="adafactor",
        lr=0.01,
        wd=0.0,
        clip=None,
        steps=500_000,
        top_p=0.8,
        data_kind="sentencepiece",
        batch_size=128,
    ),
    "imagenet64": _official(
        n_vocab=256,
        d_model=2048,
        d_v=4096,
        n_layer=24,
        seq_len=12_288,
        update_len=1536,
        abs_pe=True,
        p_dropsin=0.1,
        p_dropres=0.0,
        p_droplyr=0.0,
        tie=True,
        preln=True,
        optimizer="adafactor",
        lr=0.01,
        wd=0.0,
        clip=None,
        steps=500_000,
        top_p=0.999,
        data_kind="images",
        batch_size=128,
    ),
}
"""Named run configurations.

`enwik8`, `pg19` and `imagenet64` copy the official Transformer-VQ launch
scripts (github.com/transformer-vq/transformer_vq, legacy branch,
`scripts/lm_{enwik8,pg19,imagenet64}.sh`): widths, depth, dropout rates,
`c_beta`, `c_gamma`, optimizer, peak lr, weight decay, clipping, warmup
10k, total updates, global batch 128, `update_len`, nucleus `p`, float32
params with bfloat16 activations, `pe_lam` 1e5. The sequence length
(8192; 12288 for ImageNet64), block length 512 and 512 codes are the paper's
(the scripts take them as arguments; the newer official `config_*.py` use
the same values, but global batch 32/32/16 without `update_len`).
`mem_len=512` (= block_len) is our choice for the script's free `-m`
argument. Not reproduced: the official output-logit scale `e_scale` (0.005
for pg19/imagenet64; tvq-eqx has no such knob) and the PG-19 vocabulary is
whatever SentencePiece model you pass (the official one has 32k pieces).
"""
