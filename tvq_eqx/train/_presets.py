"""The named presets (tiny, enwik8, pg19, imagenet64) as `RunConfig` values,
and the conversion of the official launch scripts' flags."""

from __future__ import annotations

from typing import Any

from .._config import TransformerConfig
from ._optimizer import OptimizerConfig
from ._run_config import DataConfig, DataKind, RunConfig

# The official launch scripts' settings (scripts/lm_{enwik8,pg19,imagenet64}.sh
# with scripts/launch.py defaults). The scripts leave sequence_len, block_len,
# mem_len, n_code, agg_cache, grad_thru_cache, dtype and prng_seed to their
# command line; the values below are the paper's (T 8192, 12288 for
# ImageNet64; L = M = 512, as the official README says; 512 codes; bfloat16
# activations), `grad_thru_cache=1` and seed 0.
_OFFICIAL_COMMON = dict(
    global_batch_size=128,
    block_len=512,
    mem_len=512,
    n_code=512,
    agg_cache=1,
    grad_thru_cache=1,
    param_dtype="float32",
    dtype="bfloat16",
    d_k=128,
    d_ff=0,
    n_head=1,
    n_layer=24,
    pe_lam=100000,
    p_dropemb=0.0,
    c_beta=0.0001,
    c_gamma=0.99,
    lr_schedule="cosine",
    n_warmup_step=10000,
    n_extra_step=0,
    n_print_step=200,
    n_save_step=1000,
    n_eval_step=100,
    n_save_keep=5,
    prng_seed=0,
)
OFFICIAL_LAUNCH: dict[str, dict[str, Any]] = {
    "enwik8": dict(
        _OFFICIAL_COMMON,
        dataset="enwik8",
        sequence_len=8192,
        update_len=2048,
        d_model=768,
        d_v=1536,
        pe_abs=0,
        p_dropsin=0.2,
        p_dropres=0.5,
        p_droplyr=0.3,
        e_tie=0,
        e_preln=0,
        e_scale=1.0,
        grad_clip=0.1,
        optimizer="adamw",
        lr_max=0.0004,
        wd_lam=0.0002,
        p_nucleus=0.9,
        n_max_step=125000,
    ),
    "pg19": dict(
        _OFFICIAL_COMMON,
        dataset="pg19",
        sequence_len=8192,
        update_len=2048,
        d_model=2048,
        d_v=4096,
        pe_abs=0,
        p_dropsin=0.1,
        p_dropres=0.1,
        p_droplyr=0.1,
        e_tie=1,
        e_preln=1,
        e_scale=0.005,
        grad_clip=None,
        optimizer="adafactor",
        lr_max=0.01,
        wd_lam=0.0,
        p_nucleus=0.8,
        n_max_step=500000,
    ),
    "imagenet64": dict(
        _OFFICIAL_COMMON,
        dataset="imagenet64",
        sequence_len=12288,
        update_len=1536,
        d_model=2048,
        d_v=4096,
        pe_abs=1,
        p_dropsin=0.1,
        p_dropres=0.0,
        p_droplyr=0.0,
        e_tie=1,
        e_preln=1,
        e_scale=0.005,
        grad_clip=None,
        optimizer="adafactor",
        lr_max=0.01,
        wd_lam=0.0,
        p_nucleus=0.999,
        n_max_step=500000,
    ),
}

_DATASETS: dict[str, tuple[DataKind, int]] = {
    # official dataset -> (our data_kind, vocabulary size)
    "enwik8": ("bytes", 256),
    "pg19": ("sentencepiece", 32_000),
    "imagenet64": ("images", 256),
}
# Official launch flags that do not change what is computed.
_IGNORED = (
    "multihost",
    "command",
    "data_dir",
    "in_checkpoint_dir",
    "out_checkpoint_dir",
    "model_name",
    "run_id",
)


def from_official(args: dict[str, Any]) -> RunConfig:
    """The `RunConfig` equal to an official `scripts/launch.py` invocation.

    `args` holds the official flag names (`global_batch_size`, `sequence_len`,
    `e_tie`, `agg_cache`, `lr_max`, `n_max_step`, ...; see `OFFICIAL_LAUNCH`).
    Every flag that changes the computation must be present; flags tvq-eqx
    cannot honour (`d_ff > 0`, `n_extra_step > 0`, a schedule other than
    `cosine`) raise a `ValueError` naming them. `vocab_path` becomes
    `tokenizer`; `n_vocab` defaults to the dataset's (32,000 for PG-19).
    """
    # Each step pops the flags it reads; anything left over is unknown.
    a = dict(args)
    for name in _IGNORED:
        a.pop(name, None)
    dataset = a.pop("dataset")
    if dataset not in _DATASETS:
        raise ValueError(f"dataset must be one of {sorted(_DATASETS)}; got {dataset!r}")
    data_kind, n_vocab = _DATASETS[dataset]
    _refuse_unsupported(a)
    run = _official_run(a, _official_model(a, a.pop("n_vocab", n_vocab)), data_kind)
    if a:
        raise ValueError(f"unknown official launch flags: {sorted(a)}")
    return run


def official_model_config(flags: dict[str, Any]) -> TransformerConfig:
    """The `TransformerConfig` of an official model from its launch flags
    (`scripts/launch.py` names: `d_model`, `d_k`, `d_v`, `n_head`, `n_code`,
    `n_layer`, `n_vocab`, `block_len`, `mem_len`, the four dropout rates,
    `c_beta`, `c_gamma`, `param_dtype`, `dtype`, `agg_cache`,
    `grad_thru_cache`, `e_tie`, `pe_abs`, `e_preln`, `pe_lam`, `e_scale`;
    `d_ff`, when given, must be 0). Other flags (optimizer, data, loop) are
    ignored, so the whole `vars(args)` of an official run works; a missing
    model flag is a `ValueError` naming it."""
    a = dict(flags)
    if a.get("d_ff", 0) != 0:
        raise ValueError("d_ff > 0 (feed-forward layers) is not supported")
    if "n_vocab" not in a:
        raise ValueError("official flags lack 'n_vocab' (the vocabulary size)")
    try:
        return _official_model(a, a.pop("n_vocab"))
    except KeyError as e:
        raise ValueError(f"official flags lack {e.args[0]!r}") from None


def _refuse_unsupported(a: dict[str, Any]) -> None:
    """The official flags whose settings tvq-eqx cannot honour."""
    if a.pop("d_ff") != 0:
        raise ValueError("d_ff > 0 (feed-forward layers) is not supported")
    if a.pop("n_extra_step") != 0:
        raise ValueError("n_extra_step > 0 (constant-lr extra steps) is not supported")
    if a.pop("lr_schedule") != "cosine":
        raise ValueError("only lr_schedule='cosine' is supported")


def _official_model(a: dict[str, Any], n_vocab: int) -> TransformerConfig:
    """The model flags, popped from `a`, as a `TransformerConfig`."""
    return TransformerConfig(
        n_vocab=n_vocab,
        d_model=a.pop("d_model"),
        d_k=a.pop("d_k"),
        d_v=a.pop("d_v"),
        n_head=a.pop("n_head"),
        n_code=a.pop("n_code"),
        n_layer=a.pop("n_layer"),
        block_len=a.pop("block_len"),
        mem_len=a.pop("mem_len"),
        p_dropemb=float(a.pop("p_dropemb")),
        p_dropsin=float(a.pop("p_dropsin")),
        p_dropres=float(a.pop("p_dropres")),
        p_droplyr=float(a.pop("p_droplyr")),
        c_beta=float(a.pop("c_beta")),
        c_gamma=float(a.pop("c_gamma")),
        param_dtype=a.pop("param_dtype"),
        dtype=a.pop("dtype"),
        attention="vq" if a.pop("agg_cache") else "window",
        grad_thru_cache=bool(a.pop("grad_thru_cache")),
        tie_embeddings=bool(a.pop("e_tie")),
        abs_pe=bool(a.pop("pe_abs")),
        output_norm=bool(a.pop("e_preln")),
        pe_lam=float(a.pop("pe_lam")),
        e_scale=float(a.pop("e_scale")),
    )


def _official_run(
    a: dict[str, Any], model: TransformerConfig, data_kind: DataKind
) -> RunConfig:
    """The data, optimizer and loop flags, popped from `a`, around `model`."""
    seq_len = a.pop("sequence_len")
    n_save_step = a.pop("n_save_step")
    grad_clip = a.pop("grad_clip")
    return RunConfig(
        model=model,
        data=DataConfig(
            kind=data_kind,
            tokenizer=a.pop("vocab_path", None),
            batch_size=a.pop("global_batch_size"),
            seq_len=seq_len,
        ),
        optimizer=OptimizerConfig(
            name=a.pop("optimizer"),
            learning_rate=float(a.pop("lr_max")),
            warmup_steps=a.pop("n_warmup_step"),
            weight_decay=float(a.pop("wd_lam")),
            grad_clip=None if grad_clip is None else float(grad_clip),
            final_lr_ratio=0.1,  # the official cosine schedule's alpha
        ),
        update_len=a.pop("update_len"),
        steps=a.pop("n_max_step"),
        # The official loop evaluates n_eval_step batches and saves (when
        # validation improved) every n_save_step updates.
        eval_every=n_save_step,
        eval_batches=a.pop("n_eval_step"),
        log_every=a.pop("n_print_step"),
        save_every=n_save_step,
        keep=a.pop("n_save_keep"),
        sample_len=seq_len,  # the official sampler fills one whole sequence
        temperature=1.0,
        top_p=float(a.pop("p_nucleus")),
        seed=a.pop("prng_seed"),
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
        data=DataConfig(kind="bytes", batch_size=8, seq_len=256),
        optimizer=OptimizerConfig(
            name="adamw",
            learning_rate=3e-3,
            warmup_steps=20,
            weight_decay=2e-4,
            grad_clip=1.0,
        ),
        update_len=256,
        steps=600,
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
    "enwik8": from_official(OFFICIAL_LAUNCH["enwik8"]),
    "pg19": from_official(OFFICIAL_LAUNCH["pg19"]),
    "imagenet64": from_official(OFFICIAL_LAUNCH["imagenet64"]),
}
"""Named run configurations.

`enwik8`, `pg19` and `imagenet64` are the official Transformer-VQ launch
scripts (github.com/transformer-vq/transformer_vq,
`scripts/lm_{enwik8,pg19,imagenet64}.sh` with the `scripts/launch.py`
defaults), converted field by field by `from_official` from
`OFFICIAL_LAUNCH`: widths, depth, dropout rates, `c_beta`, `c_gamma`,
`e_tie`/`e_preln`/`e_scale`, `pe_abs`, `pe_lam` 1e5, optimizer, peak lr,
decoupled weight decay, clipping, warmup 10k, cosine to 0.1, total updates,
global batch 128, `update_len`, nucleus `p`, printing/eval/save cadence,
float32 params. The arguments the scripts leave to their command line take
the paper's values (sequence 8192, 12288 for ImageNet64; block length and
`mem_len` 512; 512 codes; bfloat16 activations; the compressive cache on;
gradients through the cache; seed 0). The PG-19 vocabulary is whatever
SentencePiece model you pass (`n_vocab` 32,000, as the official one).
"""
