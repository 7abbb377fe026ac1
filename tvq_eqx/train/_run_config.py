"""`RunConfig`: model, data, optimizer and loop settings of a training run, as
nested frozen dataclasses (one place for every default; `Literal` fields
checked by `tvq_eqx._config.check_literals`)."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal, get_args

from .._config import TransformerConfig, check_literals
from ..ops._padding import partial_blocks_error
from ._codebook import CodebookConfig
from ._optimizer import OptimizerConfig

DataKind = Literal["bytes", "sentencepiece", "images"]
NonFinite = Literal["stop", "skip"]
DATA_KINDS: tuple[str, ...] = get_args(DataKind)


def _check_int(owner: str, name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{owner}.{name} must be {what}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What a run reads and how its batches are cut."""

    path: str | None = None
    """Text file or folder (bytes), folder of documents (sentencepiece) or of
    images; None = the bundled Shakespeare corpus."""
    kind: DataKind = "bytes"
    """bytes (90/5/5 split, or the enwik8 split), sentencepiece or images."""
    tokenizer: str | None = None
    """SentencePiece model file (kind sentencepiece only)."""
    batch_size: int = 8
    """Global batch size (rows), split over devices."""
    seq_len: int = 256
    """Tokens per row per batch."""

    def __post_init__(self):
        check_literals(self)
        for name in ("batch_size", "seq_len"):
            _check_int("DataConfig", name, getattr(self, name), minimum=1)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs: `model`, `data`, `optimizer` and the
    loop's own settings.

    Steps count *optimizer updates* (as the official `n_max_step`): each batch
    of `data.seq_len` tokens per row gives `seq_len // update_len` updates, so
    `steps` must be a multiple of that.

    `context_len`: tokens of history each row's attention state carries
    before it is emptied, in training and evaluation (a multiple of
    `seq_len`); 0 = never within an epoch. The official recipe trains and
    evaluates on independent sequences (`context_len = seq_len`). Unbounded
    carried history at small budgets hurts: the per-code counts of a long
    cache outweigh the bounded query-key scores before the model learns to use
    them (see docs/benchmarks.md).
    """

    model: TransformerConfig = TransformerConfig()
    """The model's hyperparameters."""
    data: DataConfig = DataConfig()
    """The data and its batching."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """The optimizer (its schedule spans `steps`)."""
    codebook: CodebookConfig = CodebookConfig()
    """Codebook initialisation and dead-code restart (training procedures; default: the official neither)."""
    steps: int = 400
    """Optimizer updates in the whole run."""
    update_len: int = 256
    """Tokens per optimizer update (dividing seq_len; any length, a partial last block is padded and masked, except with cache_decay < 1 or attention=block_window: a multiple of block_len)."""
    grad_accum: int = 1
    """Gradient accumulation: each update's rows in this many micro-batches, one after the other (memory of one micro-batch's activations; the update equals the whole batch's). Must divide each device's rows of data.batch_size."""
    context_len: int = 0
    """History carried before the attention state is emptied (multiple of seq_len; 0 = the epoch)."""
    eval_every: int = 100
    """Validate every this many updates (0 = only at the end)."""
    eval_batches: int = 0
    """Validation batches per evaluation (0 = the whole split)."""
    log_every: int = 10
    """Log training metrics every this many updates."""
    save_every: int = 0
    """Checkpoint every this many updates (0 = only at the end)."""
    keep: int = 3
    """Checkpoints kept (older ones are deleted)."""
    sample_len: int = 400
    """Tokens sampled after training (0 = none)."""
    temperature: float = 1.0
    """Sampling temperature (<= 0 = greedy)."""
    top_p: float = 0.9
    """Nucleus mass for sampling, in (0, 1]."""
    seed: int = 0
    """Seed of the parameters, dropout and data order."""
    doc_masking: bool = False
    """Mask packed documents: attention stays inside each document of a row (the batches' doc_starts reach loss_fn). Off by default, as the official code, which packs documents without masking them."""
    on_nonfinite: NonFinite = "stop"
    """A non-finite loss or gradient norm: stop (training ends naming the update; nothing non-finite is saved, the last finite checkpoint stays; the command exits 1) or skip (that update is not applied, counted as skipped_updates; training stops once more than max_skipped were skipped)."""
    max_skipped: int = 10
    """With on_nonfinite=skip: how many skipped updates a run tolerates."""
    save_every_minutes: float = 0.0
    """Also checkpoint once this many minutes passed since the last checkpoint (0 = off): a preemption loses at most that much work."""

    def __post_init__(self):
        for name, cls in (
            ("model", TransformerConfig),
            ("data", DataConfig),
            ("optimizer", OptimizerConfig),
            ("codebook", CodebookConfig),
        ):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(
                    f"RunConfig.{name} must be a {cls.__name__}; got "
                    f"{type(getattr(self, name)).__name__}"
                )
        for name in ("steps", "update_len", "grad_accum", "log_every", "keep"):
            _check_int("RunConfig", name, getattr(self, name), minimum=1)
        check_literals(self)
        for name in (
            "context_len",
            "eval_every",
            "eval_batches",
            "save_every",
            "sample_len",
            "seed",
            "max_skipped",
        ):
            _check_int("RunConfig", name, getattr(self, name), minimum=0)
        seq = self.data.seq_len
        m = self.model
        # Any update_len: the model pads a partial last block (masked), except
        # where the carried state depends on where blocks begin.
        error = (
            None
            if m.attention == "full"
            else partial_blocks_error(
                self.update_len, block_len=m.block_len,
                use_cache=m.attention == "vq",
                sliding_window=m.attention == "window",
                cache_decay=m.cache_decay,
                online=m.codebook_mode == "online",
            )
        )  # fmt: skip
        if error is not None:
            raise ValueError(f"update_len={self.update_len}: {error}")
        if seq % self.update_len != 0:
            raise ValueError(
                f"seq_len={seq} must be a multiple of update_len={self.update_len} "
                "(each batch row is cut into update segments)"
            )
        if self.data.batch_size % self.grad_accum != 0:
            raise ValueError(
                f"grad_accum={self.grad_accum} (--grad-accum) must divide the "
                f"batch size data.batch_size={self.data.batch_size} (each "
                "micro-batch takes batch_size / grad_accum rows)"
            )
        if self.steps % self.updates_per_batch != 0:
            raise ValueError(
                f"steps={self.steps} (optimizer updates) must be a multiple of "
                f"seq_len / update_len = {self.updates_per_batch}"
            )
        if self.context_len % seq != 0:
            raise ValueError(
                f"context_len={self.context_len} must be a multiple of "
                f"seq_len={seq} (or 0 = carry the state through the epoch)"
            )
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
        ):
            raise ValueError(
                "RunConfig.temperature must be a finite float (<= 0 = greedy); "
                f"got {self.temperature!r}"
            )
        minutes = self.save_every_minutes
        if (
            isinstance(minutes, bool)
            or not isinstance(minutes, (int, float))
            or not math.isfinite(minutes)
            or minutes < 0
        ):
            raise ValueError(
                "RunConfig.save_every_minutes must be a finite number >= 0 "
                f"(0 = off); got {minutes!r}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"RunConfig.top_p must be in (0, 1]; got {self.top_p!r}")
        if not isinstance(self.doc_masking, bool):
            raise ValueError(
                f"RunConfig.doc_masking must be a bool; got {self.doc_masking!r}"
            )
        if self.doc_masking:
            self.model.check_masks_documents("doc_masking")
        if self.data.kind in ("bytes", "images") and self.model.n_vocab < 256:
            raise ValueError(
                f"{self.data.kind} data needs n_vocab >= 256; got {self.model.n_vocab}"
            )

    def resets_state(self, window: int) -> bool:
        """Whether the carried attention state is emptied before window `window`
        (the index of a batch within its epoch / evaluation pass)."""
        if window == 0:
            return True
        return (
            self.context_len > 0
            and (window * self.data.seq_len) % self.context_len == 0
        )

    @property
    def updates_per_batch(self) -> int:
        return self.data.seq_len // self.update_len

    @property
    def total_batches(self) -> int:
        return self.steps // self.updates_per_batch

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (validated again). Nested groups
        take a dict of their own field changes: `run.replace(steps=8,
        model=dict(d_model=64), data=dict(seq_len=128))`; a new
        `model.block_len` moves `mem_len` with it when they were equal."""
        return dataclasses.replace(self, **_nested_changes(self, changes))

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (JSON/TOML-ready; `None` kept)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """The inverse of `to_dict`; unknown keys are a `ValueError` naming
        them. A flat dict of the earlier (tvq-eqx 0.1) layout is accepted, and
        a `run.json` as is (its `run_id` is the run's name, not a setting)."""
        return cls().updated(
            _from_legacy({k: v for k, v in d.items() if k != "run_id"})
        )

    def updated(self, changes: dict[str, Any]) -> RunConfig:
        """A copy with a nested dict of changes applied (as `replace`, but
        unknown keys raise a `ValueError` naming them; a TOML file's tables)."""
        _check_keys(type(self), changes, "")
        return self.replace(**changes)


def _nested_changes(obj: Any, changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` with every dict aimed at a dataclass-typed field replaced by
    that field's value with the dict applied (recursively; a `None` field
    starts from its class's defaults). A new `TransformerConfig.block_len`
    moves `mem_len` with it when they were equal."""
    hints = typing.get_type_hints(type(obj))
    out = dict(changes)
    for k, v in changes.items():
        if not isinstance(v, dict) or k not in hints:
            continue
        current: Any = getattr(obj, k)
        # Update a dataclass instance in place of the field; anything else
        # (None, or a dataclass class) starts from the defaults.
        if not dataclasses.is_dataclass(current) or isinstance(current, type):
            cls = _dataclass_in(hints[k])
            if cls is None:
                continue
            current = cls()
        out[k] = dataclasses.replace(current, **_nested_changes(current, v))
    if isinstance(obj, TransformerConfig) and mem_len_follows(
        obj,
        block_len_changed="block_len" in changes,
        mem_len_given="mem_len" in changes,
    ):
        out["mem_len"] = None  # mem_len followed block_len: keep following it
    return out


def mem_len_follows(
    before: TransformerConfig, *, block_len_changed: bool, mem_len_given: bool
) -> bool:
    """Whether a change of `block_len` moves `mem_len` with it: when the two
    were equal and `mem_len` is not set explicitly (the one place this rule
    lives; `RunConfig.replace` and the command line use it)."""
    return (
        block_len_changed and not mem_len_given and before.mem_len == before.block_len
    )


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass in annotation `tp` (`C` or `C | None`), else None."""
    for t in (tp, *typing.get_args(tp)):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            return t
    return None


def _check_keys(cls: type, changes: Any, where: str) -> None:
    place = f"[{where}]" if where else "the top level"
    if not isinstance(changes, dict):
        raise ValueError(f"{place} must be a table; got {changes!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} field(s) {unknown} in {place}; "
            f"known: {sorted(names)}"
        )
    hints = typing.get_type_hints(cls)
    for k, v in changes.items():
        sub = _dataclass_in(hints[k])
        if sub is not None and isinstance(v, dict):
            _check_keys(sub, v, f"{where}.{k}" if where else k)


_LEGACY = {
    "data": ("data", "path"),
    "data_kind": ("data", "kind"),
    "tokenizer": ("data", "tokenizer"),
    "batch_size": ("data", "batch_size"),
    "seq_len": ("data", "seq_len"),
    "learning_rate": ("optimizer", "learning_rate"),
    "warmup_steps": ("optimizer", "warmup_steps"),
    "weight_decay": ("optimizer", "weight_decay"),
    "grad_clip": ("optimizer", "grad_clip"),
    "final_lr_ratio": ("optimizer", "final_lr_ratio"),
}


def _from_legacy(d: dict[str, Any]) -> dict[str, Any]:
    """Map the flat 0.1 layout (`optimizer="adamw"`, `data="path"`,
    `seq_len=...` at the top) onto the nested one; nested dicts pass through."""
    legacy = (
        isinstance(d.get("optimizer"), str)
        or isinstance(d.get("data"), str)
        or any(k in d for k in _LEGACY if k != "data")
    )
    if not legacy:
        return d
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k == "optimizer" and isinstance(v, str):
            out.setdefault("optimizer", {})["name"] = v
        elif k in _LEGACY:
            group, field = _LEGACY[k]
            out.setdefault(group, {})[field] = v
        else:
            out[k] = v
    return out
