"""Batches of long contiguous streams, for models that carry state between steps.

Transformer-VQ trains on windows of `T` tokens and carries its attention cache
from one window to the next. A batch therefore holds `B` independent streams
side by side, and batch `step + 1` continues every row of batch `step`:

    stream 0:  | window 0 | window 1 | window 2 | ...
    stream 1:  | window 0 | window 1 | window 2 | ...
                  batch 0    batch 1    batch 2

Batch `s` of an epoch is window `s` of every stream. Inputs and targets are the
same stream shifted by one, so `targets[s][:, -1] == inputs[s + 1][:, 0]`.

Rows hold packed documents: `doc_ids` names the document of every input token
and `doc_starts` marks where one begins, so that a model masking documents
(`loss_fn` with `batch["doc_starts"]`) keeps attention inside each.
"""

import abc
import math
from collections.abc import Iterator, Sequence

import numpy as np
from jaxtyping import Bool, Int, Integer

_Lookup = tuple[
    Integer[np.ndarray, "B P"], Bool[np.ndarray, "B P"], Int[np.ndarray, "B P"]
]

Batch = dict[str, np.ndarray]
"""`inputs`, `targets`, `doc_ids`: int32 `[B, T]`; `loss_mask`: float32 `[B, T]`;
`doc_starts`: bool `[B, T]`."""


def _check_int(name: str, value: int, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class AbstractStream(abc.ABC):
    """Deterministic, resumable batches over `batch_size` parallel streams.

    Subclasses say what token sits at each (row, position) in a given epoch;
    this class cuts the rows into windows and builds the batch dict.

    **Batches** (`batch(step)`), all of shape `[B, T]` with `B = batch_size`,
    `T = seq_len`:

    - `inputs` (int32): tokens; `pad_id` past the end of a row.
    - `targets` (int32): the next token of the same row; `pad_id` where there
      is none.
    - `loss_mask` (float32): 1 where `targets` is a real token, 0 on padding.
    - `doc_ids` (int32): id of the document each input token belongs to,
      increasing along a row (a change marks a document boundary, where a model
      carrying state may reset it); -1 on padding.
    - `doc_starts` (bool): True where an input token's document differs from
      that of the row's previous input token, the last one of the previous
      window included (so the marks agree with `doc_ids` across window
      borders and let `loss_fn` mask documents, `batch["doc_starts"]`).
      Padding counts as one more document. Position 0 of window 0 is always
      True: it starts fresh streams, whose carried state is emptied.

    **Epochs:** `num_batches` steps make one epoch; `step` maps to
    `divmod(step, num_batches) == (epoch, window)`. With `repeat=True` (train)
    any `step >= 0` is valid and each epoch is reshuffled; with `repeat=False`
    (eval) only one epoch exists. Carried state should be reset when
    `window == 0` (see `epoch_and_window`).
    """

    batch_size: int
    seq_len: int
    seed: int
    shuffle: bool
    repeat: bool
    pad_id: int
    _row_len: int

    def _init_common(
        self,
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        shuffle: bool,
        repeat: bool,
        pad_id: int,
    ) -> None:
        self.batch_size = _check_int("batch_size", batch_size, minimum=1)
        self.seq_len = _check_int("seq_len", seq_len, minimum=1)
        self.seed = _check_int("seed", seed, minimum=0)
        self.shuffle = bool(shuffle)
        self.repeat = bool(repeat)
        self.pad_id = _check_int("pad_id", pad_id, minimum=0)

    @abc.abstractmethod
    def _lookup(self, epoch: int, pos: Int[np.ndarray, " P"]) -> _Lookup:
        """Tokens, validity and doc ids at positions `pos` of every row."""

    @property
    def num_batches(self) -> int:
        """Number of steps in one epoch (the last one may be partly padding)."""
        # A row of length L has L - 1 (input, target) pairs.
        return math.ceil((self._row_len - 1) / self.seq_len)

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, epoch))

    def epoch_and_window(self, step: int) -> tuple[int, int]:
        """`(epoch, window)` of `step`: `window == 0` starts fresh streams."""
        step = _check_int("step", step, minimum=0)
        epoch, window = divmod(step, self.num_batches)
        if epoch > 0 and not self.repeat:
            raise IndexError(
                f"step {step} is past the single epoch of {self.num_batches} "
                "batches (repeat=False)"
            )
        return epoch, window

    def batch(self, step: int) -> Batch:
        """Batch number `step`, a pure function of `(seed, step)`."""
        epoch, window = self.epoch_and_window(step)
        t = self.seq_len
        # One position before the window too (the previous window's last
        # input), so that doc_starts at position 0 sees across the border.
        before = 1 if window > 0 else 0
        pos = window * t - before + np.arange(t + 1 + before, dtype=np.int64)
        tokens, valid, doc = self._lookup(epoch, pos)
        tokens = np.where(valid, tokens, self.pad_id).astype(np.int32)[:, before:]
        doc = np.where(valid, doc, -1)  # padding: a document of its own
        valid = valid[:, before:]
        doc_ids = doc[:, before:-1].astype(np.int32)
        doc_starts = np.empty(doc_ids.shape, dtype=bool)
        doc_starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        # Window 0 starts fresh streams (the carried state is emptied).
        doc_starts[:, 0] = (doc[:, 0] != doc[:, 1]) if before else True
        return {
            "inputs": np.ascontiguousarray(tokens[:, :-1]),
            "targets": np.ascontiguousarray(tokens[:, 1:]),
            "loss_mask": valid[:, 1:].astype(np.float32),
            "doc_ids": doc_ids,
            "doc_starts": doc_starts,
        }

    def iterate(self, start_step: int = 0) -> Iterator[Batch]:
        """Batches from `start_step` on: forever if `repeat`, else to epoch end.

        `iterate(k)` yields exactly what `iterate(0)` yields after `k` batches,
        so resuming needs only the step counter.
        """
        step = _check_int("start_step", start_step, minimum=0)
        while self.repeat or step < self.num_batches:
            yield self.batch(step)
            step += 1

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate(0)


def pack_documents(
    documents: Sequence[np.ndarray | Sequence[int]],
    *,
    separator: int | None = None,
) -> tuple[Integer[np.ndarray, " n"], Int[np.ndarray, " docs"]]:
    """Concatenate documents into one token array and record where each starts.

    **Arguments:**

    - `documents`: 1-D integer token arrays (or lists), in order.
    - `separator`: if given, this token is put at the start of every document
      (and counts as part of it), e.g. a BOS id outside the byte range.

    **Returns:**

    `(tokens, doc_starts)`: the concatenation (dtype of the documents, widened
    to fit `separator`) and the int64 offset where document `i` starts, to pass
    as `TokenStream(tokens, doc_starts=doc_starts, ...)`. Document `i` gets
    doc id `i`.
    """
    if len(documents) == 0:
        raise ValueError("pack_documents needs at least one document")
    arrays = [np.asarray(d) for d in documents]
    for i, a in enumerate(arrays):
        if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
            raise ValueError(
                f"document {i} must be a 1-D integer array, got dtype "
                f"{a.dtype} and shape {a.shape}"
            )
    dtype = np.result_type(*[a.dtype for a in arrays if a.size] or [np.int32])
    if separator is not None:
        _check_int("separator", separator, minimum=0)
        dtype = np.result_type(dtype, np.min_scalar_type(separator))
        sep = np.array([separator], dtype=dtype)
        arrays = [np.concatenate([sep, a.astype(dtype)]) for a in arrays]
    lengths = np.array([a.size for a in arrays], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tokens = np.concatenate([a.astype(dtype) for a in arrays])
    return tokens, starts


class TokenStream(AbstractStream):
    """Batches over one long token array cut into `batch_size` parallel streams.

    The array (length `N`) is cut into `B` contiguous streams of `L = ceil(N/B)`
    tokens (the last one padded); batch `s` of an epoch is window `s` of each
    stream, so consecutive steps continue each row's text.

    **Shuffling** (`shuffle=True`) never breaks contiguity. Each epoch `e`
    draws, from `numpy.random.default_rng((seed, e))`:

    1. a rotation `r` in `[0, N)`: the streams are cut from the token array
       rotated left by `r` (`tokens[r:]` then `tokens[:r]`), so stream borders
       and window alignment move from epoch to epoch. The join of the last
       token with the first is treated as a document boundary: tokens taken
       from `tokens[:r]` get doc id `i + num_docs`, so doc ids still increase
       along every row.
    2. a permutation of the `B` streams over the batch rows.

    With `shuffle=False`, `r = 0` and stream `b` is row `b`: stream `b` is
    `tokens[b * L:(b + 1) * L]`.

    Every token except the first of each stream is a target exactly once per
    epoch.

    **Arguments:**

    - `tokens`: 1-D integer array (kept by reference, e.g. a `np.memmap`;
      windows are cast to int32).
    - `batch_size`: number of parallel streams `B`.
    - `seq_len`: window length `T`. Needs `N >= B * (T + 1)`.
    - `seed`: shuffling seed (>= 0).
    - `shuffle`: rotate and permute streams per epoch as above.
    - `repeat`: `True` for training (endless, reshuffled epochs), `False` for a
      single pass (evaluation).
    - `doc_starts`: offsets where documents start (from `pack_documents`); must
      begin with 0 and not decrease. `None` is a single document.
    - `pad_id`: token used for padding (loss_mask 0).
    """

    tokens: Integer[np.ndarray, " n"]
    doc_starts: Int[np.ndarray, " docs"]

    def __init__(
        self,
        tokens: Integer[np.ndarray, " n"],
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = True,
        doc_starts: Int[np.ndarray, " docs"] | None = None,
        pad_id: int = 0,
    ):
        self._init_common(
            batch_size=batch_size,
            seq_len=seq_len,
            seed=seed,
            shuffle=shuffle,
            repeat=repeat,
            pad_id=pad_id,
        )
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(
                "tokens must be a 1-D integer array, got dtype "
                f"{tokens.dtype} and shape {tokens.shape}"
            )
        n = int(tokens.shape[0])
        need = self.batch_size * (self.seq_len + 1)
        if n < need:
            raise ValueError(
                f"data shorter than one window: {n} tokens, but batch_size "
                f"{self.batch_size} x (seq_len {self.seq_len} + 1) = {need} "
                "are needed; use a smaller batch_size or seq_len"
            )
        if doc_starts is None:
            doc_starts = np.zeros(1, dtype=np.int64)
        doc_starts = np.asarray(doc_starts, dtype=np.int64)
        if (
            doc_starts.ndim != 1
            or doc_starts.size == 0
            or doc_starts[0] != 0
            or np.any(np.diff(doc_starts) < 0)
            or doc_starts[-1] > n
        ):
            raise ValueError(
                "doc_starts must be a non-decreasing 1-D array that starts at 0 "
                f"and stays within the {n} tokens"
            )
        self.tokens = tokens
        self.doc_starts = doc_starts
        self._row_len = -(-n // self.batch_size)

    def _lookup(self, epoch: int, pos: Int[np.ndarray, " P"]) -> _Lookup:
        n = int(self.tokens.shape[0])
        if self.shuffle:
            rng = self._rng(epoch)
            rotation = int(rng.integers(n))
            rows = rng.permutation(self.batch_size)
        else:
            rotation = 0
            rows = np.arange(self.batch_size)
        # Index into the rotated, end-padded array of B * L tokens.
        q = rows[:, None].astype(np.int64) * self._row_len + pos[None, :]
        valid = (pos[None, :] < self._row_len) & (q < n)
        src = np.where(valid, q + rotation, 0)
        wrapped = src >= n
        src = np.where(wrapped, src - n, src)
        doc = np.searchsorted(self.doc_starts, src, side="right") - 1
        doc = doc + np.where(wrapped, self.doc_starts.size, 0)
        return self.tokens[src], valid, doc
