"""Shapes and presets of every benchmark, in one place.

Each benchmark has presets named `cpu` (the committed CPU results), `quick`
(a smoke run of a minute or two), `micro` (the test suite's shapes, seconds)
and, where it makes sense, `gpu` (lengths a GPU can hold). `preset(bench,
name)` looks one up; `python -m benchmarks.run BENCH --preset NAME` runs it.
"""

from __future__ import annotations

import dataclasses
import itertools

from tvq_eqx import TransformerConfig

# A small model for the speed benchmarks: one layer (two gated attention
# units), so that times are dominated by attention, not by the MLP-free
# projections. Same parameters for vq and full (full ignores the codebook).
SPEED_MODEL = TransformerConfig(
    n_vocab=256,
    d_model=64,
    d_k=32,
    d_v=64,
    n_head=1,
    n_code=64,
    n_layer=1,
    block_len=128,
)

# The quality model is the `tiny` training preset's (docs/training.md):
# 2 layers, d_model 128, d_k 32, d_v 256, 64 codes, block 64.
QUALITY_MODEL = TransformerConfig(
    n_vocab=256,
    d_model=128,
    d_k=32,
    d_v=256,
    n_head=1,
    n_code=64,
    n_layer=2,
    block_len=64,
)


@dataclasses.dataclass(frozen=True)
class ScalingPreset:
    """Training-step throughput and memory against sequence length.

    One batch of `batch_size` rows of `T` tokens is one update segment
    (`update_len = T`). The full model keeps a KV cache of `model.block_len`
    tokens (the smallest allowed), so its cost is the T x T attention of the
    segment. `full_max_len`: longest T at which the full model is run (longer
    ones are compiled only, for the memory estimate); runs whose compiled
    memory estimate exceeds `mem_limit_gib` are skipped."""

    model: TransformerConfig
    lengths: tuple[int, ...]
    full_max_len: int
    batch_size: int = 1
    reps: int = 3
    check_len: int = 1024
    mem_limit_gib: float = 12.0


@dataclasses.dataclass(frozen=True)
class DecodePreset:
    """Per-token sampling latency against context length.

    `model.block_len` is the decode block: each new token re-runs the current
    (partial) block from the carried state, as `tvq_eqx.sampling` does. The
    full model's KV cache is the context length. The context is fed in chunks
    of `fill_chunk` tokens; then `model.block_len` tokens are decoded per timed
    call (one block, one state update)."""

    model: TransformerConfig
    contexts: tuple[int, ...]
    fill_chunk: int = 2048
    reps: int = 5
    check_context: int = 256
    batch_size: int = 1


@dataclasses.dataclass(frozen=True)
class TTFTPreset:
    """Time to first token against prompt length: the prompt's complete
    blocks read by the one-call prefill of `tvq_eqx.sampling` (after) and by
    the earlier one-call-per-block loop (before, `_prefill_blocks`), and in
    chunks of each of `chunks` tokens per call (`prefill_chunk`), then the
    first token drawn; all paths timed side by side in interleaved rounds.
    `check_prompt`: the length of the correctness gate."""

    model: TransformerConfig
    prompts: tuple[int, ...]
    chunks: tuple[int, ...] = (512, 2048, 8192)
    reps: int = 5
    check_prompt: int = 1000
    batch_size: int = 1


@dataclasses.dataclass(frozen=True)
class QualityPreset:
    """Identical training budgets for vq, full and window models.

    `window` is the official code's `agg_cache=False` baseline: VQ attention
    with the compressive cache off, each query attending to the last
    `model.mem_len` tokens and itself (`attention="window"`). The earlier
    block-granular baseline (previous + current block) is
    `attention="block_window"`, not trained here.

    Every model has the same parameter arrays (the codebook is present but
    unused by full/window), the same data order, optimizer, steps, batch and
    sequence length. `kv_cache_len`: the full model's cache. `code_sweep`: the
    vq model is also trained with these codebook sizes."""

    model: TransformerConfig
    kv_cache_len: int
    batch_size: int
    seq_len: int
    steps: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float = 2e-4
    grad_clip: float | None = 1.0
    eval_every: int = 100
    eval_batches: int = 0  # 0 = the whole validation split
    curve_eval_batches: int = 4  # validation windows for the learning curve
    code_sweep: tuple[int, ...] = (16, 64, 256)
    seed: int = 0
    # Empty the attention state at every training batch (context <= seq_len)
    # instead of carrying it along the stream; `models`: subset to train
    # (None = vq, full, window and the sweep).
    reset_each_batch: bool = False
    models: tuple[str, ...] | None = None
    # Tokens of history the carried state holds (training and the main
    # evaluation) before it is emptied, as `RunConfig.context_len`; 0 = the
    # whole epoch / validation pass.
    context_len: int = 0


@dataclasses.dataclass(frozen=True)
class RecallPreset:
    """Long-range recall (`benchmarks/recall.py`): key-value pairs written
    `distances` blocks before the last block and queried there.

    Sequences of `n_blocks * model.block_len` positions, `n_pairs` pairs each.
    `variants`: (name, config changes) trained on the same batches, e.g.
    `("vq_decay", (("cache_decay", 0.9),))`; each is trained from every seed
    in `seeds` for `steps` updates of `batch_size` fresh sequences and scored
    on `eval_per_distance` held-out queries per distance."""

    model: TransformerConfig
    n_blocks: int
    n_pairs: int
    batch_size: int
    steps: int
    learning_rate: float
    warmup_steps: int
    distances: tuple[int, ...] = tuple(range(1, 17))
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_per_distance: int = 192
    weight_decay: float = 2e-4
    grad_clip: float | None = 1.0
    variants: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = (
        ("vq", (("attention", "vq"),)),
        ("full", (("attention", "full"),)),
        ("window", (("attention", "window"),)),
        # The remedy (issue 12, item 5): the compressive cache decayed per block.
        ("vq_decay", (("attention", "vq"), ("cache_decay", 0.9))),
    )

    @property
    def seq_len(self) -> int:
        return self.n_blocks * self.model.block_len


def _with(config: TransformerConfig, **changes) -> TransformerConfig:
    """`config.replace(**changes)`; a new `block_len` moves `mem_len` with it."""
    if "block_len" in changes and "mem_len" not in changes:
        changes["mem_len"] = None
    return config.replace(**changes)


_GPU_LENGTHS = tuple(2**i for i in range(10, 18))  # 1k .. 128k

SCALING: dict[str, ScalingPreset] = {
    "cpu": ScalingPreset(
        model=SPEED_MODEL,
        lengths=(1024, 2048, 4096, 8192, 16384, 32768),
        full_max_len=16384,
        reps=3,
    ),
    "gpu": ScalingPreset(
        model=_with(
            SPEED_MODEL, d_model=256, d_k=64, d_v=256, n_code=256, block_len=512
        ),
        lengths=_GPU_LENGTHS,
        full_max_len=131072,
        reps=5,
        mem_limit_gib=60.0,
    ),
    "quick": ScalingPreset(
        model=SPEED_MODEL,
        lengths=(1024, 2048, 4096),
        full_max_len=4096,
        reps=2,
        check_len=512,
    ),
    "micro": ScalingPreset(
        model=_with(SPEED_MODEL, d_model=32, d_k=16, d_v=32, n_code=16, block_len=32),
        lengths=(128, 256),
        full_max_len=256,
        reps=1,
        check_len=128,
    ),
}

DECODE: dict[str, DecodePreset] = {
    "cpu": DecodePreset(
        model=_with(SPEED_MODEL, block_len=32),
        contexts=(1024, 2048, 4096, 8192, 16384, 32768, 65536),
        fill_chunk=2048,
        reps=15,
    ),
    "gpu": DecodePreset(
        model=_with(
            SPEED_MODEL, d_model=256, d_k=64, d_v=256, n_code=256, block_len=64
        ),
        contexts=tuple(2**i for i in range(10, 18)),
        fill_chunk=8192,
        reps=10,
    ),
    "quick": DecodePreset(
        model=_with(SPEED_MODEL, block_len=32),
        contexts=(1024, 4096, 16384),
        fill_chunk=2048,
        reps=3,
    ),
    "micro": DecodePreset(
        model=_with(SPEED_MODEL, d_model=32, d_k=16, d_v=32, n_code=16, block_len=8),
        contexts=(64, 128),
        fill_chunk=64,
        reps=1,
        check_context=32,
    ),
}

# Prompts end mid-block (+ 1 token), so the current block holds one token.
TTFT: dict[str, TTFTPreset] = {
    "cpu": TTFTPreset(
        model=_with(SPEED_MODEL, block_len=32),
        prompts=(1024 + 1, 16384 + 1, 65536 + 1),
        reps=5,
    ),
    "gpu": TTFTPreset(
        model=_with(
            SPEED_MODEL, d_model=256, d_k=64, d_v=256, n_code=256, block_len=512
        ),
        prompts=(1024 + 1, 16384 + 1, 65536 + 1),
        reps=10,
    ),
    "quick": TTFTPreset(
        model=_with(SPEED_MODEL, block_len=32),
        prompts=(1024 + 1, 16384 + 1),
        reps=3,
    ),
    "micro": TTFTPreset(
        model=_with(SPEED_MODEL, d_model=32, d_k=16, d_v=32, n_code=16, block_len=8),
        prompts=(33, 129),
        chunks=(16, 64),
        reps=1,
        check_prompt=45,
    ),
}

QUALITY: dict[str, QualityPreset] = {
    "cpu": QualityPreset(
        model=QUALITY_MODEL,
        kv_cache_len=512,
        batch_size=8,
        seq_len=256,
        steps=300,
        learning_rate=3e-3,
        warmup_steps=30,
        eval_every=100,
    ),
    "quick": QualityPreset(
        model=_with(QUALITY_MODEL, d_model=64, d_v=128),
        kv_cache_len=256,
        batch_size=4,
        seq_len=256,
        steps=30,
        learning_rate=3e-3,
        warmup_steps=5,
        eval_every=15,
        eval_batches=4,
        curve_eval_batches=2,
        code_sweep=(16, 64),
    ),
    "micro": QualityPreset(
        model=_with(
            QUALITY_MODEL,
            d_model=32,
            d_k=16,
            d_v=32,
            n_code=16,
            n_layer=1,
            block_len=16,
        ),
        kv_cache_len=32,
        batch_size=2,
        seq_len=64,
        steps=4,
        learning_rate=3e-3,
        warmup_steps=1,
        eval_every=2,
        eval_batches=2,
        curve_eval_batches=1,
        code_sweep=(8, 16),
    ),
}
# Diagnostic: the same budget, but the attention state is emptied at every
# training batch, so no model sees more than the 256-byte training window.
QUALITY["cpu-shortctx"] = dataclasses.replace(
    QUALITY["cpu"],
    reset_each_batch=True,
    models=("vq", "full", "window"),
)
# The training layer's bounded carried history (`RunConfig.context_len`, the
# tiny preset's 1,024 bytes): the cache spans 4 consecutive batches; full gets
# a KV cache of the same length.
QUALITY["cpu-ctx1024"] = dataclasses.replace(
    QUALITY["cpu"],
    context_len=1024,
    kv_cache_len=1024,
    models=("vq", "full", "window"),
)
QUALITY["gpu"] = QUALITY["cpu"]

# The three models of the regime benchmark: name -> `TransformerConfig`
# changes applied to the quality preset's model (whose `kv_cache_len` is the
# preset's). Adding a variant is one more entry here.
REGIME_VARIANTS: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = (
    ("vq", ()),
    ("full", (("attention", "full"),)),
    ("window", (("attention", "window"),)),
    # The remedy (issue 12, item 5): the compressive cache decayed per block.
    ("vq_decay", (("cache_decay", 0.9),)),
)


@dataclasses.dataclass(frozen=True)
class RegimePreset:
    """Does the compressive cache pay off? Models trained in the paper's
    regime, several seeds each, scored per position inside the sequence.

    `quality`: the training budget of every run (model, optimizer, steps,
    batch, update segment `seq_len`); its `context_len` is the training
    sequence length (the state is emptied every `context_len` bytes).
    `variants`: (name, `TransformerConfig` changes) of each model; `seeds`:
    each variant is trained once per seed (`QualityPreset.seed`).
    `extrapolation`: evaluation sequence lengths as multiples of the training
    sequence; `bucket_edges`: position buckets in blocks (`[lo, hi)`).
    `corpus`: `"bundled"` (`tvq_eqx.data.load_bytes()`) or `"linux-doc"`
    (English reST of Debian's linux-doc-6.1, first `linux_doc_bytes`).
    Evaluation text: the `eval_splits` of `tvq_eqx.data.split_bytes`,
    concatenated (contiguous in the corpus), cut into non-overlapping
    sequences; at most `eval_bytes` of it per multiple (0 = all), run
    `eval_batch` sequences at a time (fewer when fewer fit)."""

    quality: QualityPreset
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = REGIME_VARIANTS
    extrapolation: tuple[int, ...] = (1, 4, 16)
    bucket_edges: tuple[int, ...] = (0, 2, 4, 8, 16, 32, 64, 256)
    corpus: str = "bundled"
    eval_splits: tuple[str, ...] = ("validation", "test")
    eval_bytes: int = 0
    eval_batch: int = 4
    linux_doc_bytes: int = 2**21

    def __post_init__(self):
        q = self.quality
        if q.context_len <= 0 or q.context_len % q.model.block_len:
            raise ValueError(
                f"RegimePreset.quality.context_len must be a positive multiple of "
                f"block_len={q.model.block_len}; got {q.context_len}"
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"RegimePreset.seeds must be distinct; got {self.seeds}")
        names = [n for n, _ in self.variants]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"RegimePreset.variants need distinct names; got {names}")
        if not self.extrapolation or any(m < 1 for m in self.extrapolation):
            raise ValueError(
                f"RegimePreset.extrapolation must be ints >= 1; got {self.extrapolation}"
            )
        e = self.bucket_edges
        if len(e) < 2 or e[0] != 0 or any(a >= b for a, b in itertools.pairwise(e)):
            raise ValueError(f"RegimePreset.bucket_edges must increase from 0; got {e}")
        if self.corpus not in ("bundled", "linux-doc"):
            raise ValueError(
                f"RegimePreset.corpus must be 'bundled' or 'linux-doc'; got "
                f"{self.corpus!r}"
            )

    @property
    def sequence_len(self) -> int:
        """Training sequence length (bytes between state resets)."""
        return self.quality.context_len


REGIME: dict[str, RegimePreset] = {
    # 3 seeds x (vq, full, window) at the cpu-ctx1024 budget: 300 updates of
    # 8 x 256 bytes, block 64, sequences of 1,024 bytes (16 blocks).
    "cpu": RegimePreset(quality=QUALITY["cpu-ctx1024"]),
    "quick": RegimePreset(
        quality=dataclasses.replace(
            QUALITY["quick"], context_len=1024, kv_cache_len=1024, eval_batches=0
        ),
        seeds=(0, 1),
        eval_bytes=16384,
    ),
    "micro": RegimePreset(
        quality=dataclasses.replace(
            QUALITY["micro"], context_len=128, kv_cache_len=128
        ),
        seeds=(0, 1),
        extrapolation=(1, 2),
        eval_bytes=512,
        eval_batch=2,
    ),
}
# One seed on a second corpus (Debian linux-doc-6.1 reST, 2 MiB).
# The held-out text (validation + test) is 210 KB there: the first 64 KiB are
# scored, about the bundled corpus's 51.8 KB.
REGIME["gpu"] = REGIME["cpu"]  # so that `run all` finds a preset on a GPU
REGIME["cpu-linuxdoc"] = dataclasses.replace(
    REGIME["cpu"], seeds=(0,), corpus="linux-doc", eval_bytes=65536
)

BENCHMARKS = {
    "scaling": SCALING,
    "decode": DECODE,
    "ttft": TTFT,
    "quality": QUALITY,
    "regime": REGIME,
}

# Recall: one layer (two gated attention units), d_model 64, blocks of 8 so
# that 16-block distances fit in 136 positions; the loss is the mean over the
# answers (the only masked-in positions). One pair per sequence: the settings
# under which a probe learned at all within a CPU budget (see recall.py).
RECALL_MODEL = _with(
    QUALITY_MODEL,
    d_model=64,
    d_v=128,
    n_layer=1,
    block_len=8,
    lm_loss_average="tokens",
)
RECALL: dict[str, RecallPreset] = {
    "cpu": RecallPreset(
        model=RECALL_MODEL,
        n_blocks=17,
        n_pairs=1,
        batch_size=16,
        steps=500,
        learning_rate=3e-3,
        warmup_steps=20,
    ),
    "quick": RecallPreset(
        model=RECALL_MODEL,
        n_blocks=17,
        n_pairs=1,
        batch_size=16,
        steps=150,
        learning_rate=3e-3,
        warmup_steps=20,
        seeds=(0,),
        eval_per_distance=64,
    ),
    "micro": RecallPreset(
        model=_with(RECALL_MODEL, d_model=32, d_k=16, d_v=32, n_code=16),
        n_blocks=6,
        n_pairs=2,
        batch_size=2,
        steps=2,
        learning_rate=3e-3,
        warmup_steps=1,
        distances=(1, 2, 3, 4),
        seeds=(0, 1),
        eval_per_distance=4,
    ),
}
BENCHMARKS["recall"] = RECALL


def preset(bench: str, name: str):
    """The preset `name` of benchmark `bench` (ValueError naming the choices)."""
    if bench not in BENCHMARKS:
        raise ValueError(
            f"unknown benchmark {bench!r}; choose from {sorted(BENCHMARKS)}"
        )
    table = BENCHMARKS[bench]
    if name not in table:
        raise ValueError(f"{bench} has no preset {name!r}; choose from {sorted(table)}")
    return table[name]
