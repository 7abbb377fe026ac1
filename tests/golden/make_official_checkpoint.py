"""A checkpoint written by the official Transformer-VQ code (not run in CI).

Builds a tiny official model (the `default` case of `generate.py`: its `BASE`
sizes and `OFFICIAL_DEFAULTS` switches, parameters perturbed off their init
values by the same `_perturb`), wraps the parameters in a flax `TrainState`
with the official optimizer layout (`optax.multi_transform`: AdamW for
`main`, SGD for the `c_*` codebook parameters, as `scripts/launch.py`
`get_tx`), and saves it with the official
`transformer_vq.utils.io.save_checkpoint`, unmodified. Beside it goes
`expected.npz`: the official model's log-probabilities on fixed tokens over
two consecutive update segments (carrying the attention state), and a `meta`
JSON with the official launch flags of the model and the versions.

`tests/test_weights.py` loads the checkpoint with `tvq_eqx.load_official`
(numpy + msgpack only) and compares the log-probabilities.

Environment: the official pins (`setup.py`: flax 0.6.11, orbax-checkpoint
0.1.7, optax 0.1.5), whose checkpoint format is what an official run
writes. jaxlib 0.4.9 (the official pin) has no wheel on the package index
any more; jax 0.4.13 is the oldest there, and it renamed
`jax.experimental.gda_serialization` (imported by orbax-checkpoint 0.1.7) to
`array_serialization`, so this script registers the old name as an alias
before importing orbax. `transformer_vq.utils.io` imports tensorflow (for its
text/image writers, not for checkpoints); a stub module stands in for it
while that module imports.
Python 3.10::

    python3.10 -m venv /tmp/official-ckpt-venv
    /tmp/official-ckpt-venv/bin/pip install "jax==0.4.13" "jaxlib==0.4.13" \\
        "flax==0.6.11" "orbax-checkpoint==0.1.7" "optax==0.1.5" "chex==0.1.7" \\
        "numpy<1.25" "ml_dtypes==0.2.0" "tensorstore<0.1.45"
    /tmp/official-ckpt-venv/bin/python tests/golden/make_official_checkpoint.py \\
        --official-repo /path/to/transformer_vq(.git)

The output is deterministic: a rerun writes the same checkpoint bytes.

What results (flax 0.6.11 saves through Orbax by default,
`flax_use_orbax_checkpointing=True`; every array of a one-host run is fully
replicated, so `orbax_utils.save_args_from_target` aggregates it into one
msgpack file, the flax msgpack encoding with arrays as extension type 1)::

    tests/fixtures/official_checkpoint/
        checkpoint_1000/checkpoint   msgpack: {"step", "params", "opt_state"}
        expected.npz                 inputs [n_seg, B, T], logprobs [n_seg, B, T, V], meta
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from generate import BASE, OFFICIAL_DEFAULTS, _perturb, export_official  # noqa: E402

OUT = os.path.join(os.path.dirname(HERE), "fixtures", "official_checkpoint")
STEP = 1000


def _shim_environment() -> None:
    """The two stand-ins the module docstring explains (no official code or
    library code is changed)."""
    import jax.experimental.array_serialization.serialization as serialization

    old = types.ModuleType("jax.experimental.gda_serialization")
    old.serialization = serialization  # type: ignore[attr-defined]
    sys.modules["jax.experimental.gda_serialization"] = old
    sys.modules["jax.experimental.gda_serialization.serialization"] = serialization
    # The tensorflow stub is there only while the official module imports:
    # flax and etils probe for tensorflow (gfile) and must find none.
    import flax.training.checkpoints  # noqa: F401

    sys.modules["tensorflow"] = types.ModuleType("tensorflow")
    try:
        import transformer_vq.utils.io  # noqa: F401
    finally:
        del sys.modules["tensorflow"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--official-src", help="an exported official src/ directory")
    src.add_argument("--official-repo", help="git dir of the official repository")
    ap.add_argument("--official-commit", default=None, help="recorded in meta")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.official_repo:
        src_dir, commit = export_official(args.official_repo)
    else:
        src_dir, commit = args.official_src, args.official_commit or "unknown"
    sys.path.insert(0, src_dir)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax

    jax.config.update("jax_enable_x64", False)
    jax.config.update("jax_default_matmul_precision", "highest")
    _shim_environment()
    run(args.out, args.seed, commit)


def run(out_dir: str, seed: int, commit: str) -> None:
    import flax
    import jax
    import jax.numpy as jnp
    import optax
    from flax import traverse_util
    from flax.training.train_state import TrainState
    from transformer_vq.nn.model import Transformer
    from transformer_vq.nn.types import TransformerConfig
    from transformer_vq.nn.vq import VQSpec
    from transformer_vq.utils.io import save_checkpoint
    from transformer_vq.utils.tree import flattened_traversal

    b, s = BASE, OFFICIAL_DEFAULTS
    L, K, n_seg, B = b["block_len"], b["n_block_per_update"], b["n_segment"], b["batch"]
    T = L * K
    # The official launch flags of the model (scripts/launch.py names).
    flags = dict(
        param_dtype="float32",
        dtype="float32",
        global_batch_size=B,
        sequence_len=T * n_seg,
        update_len=T,
        block_len=L,
        mem_len=s["mem_len"] or L,
        grad_thru_cache=s["grad_thru_cache"],
        agg_cache=s["agg_cache"],
        d_model=b["d_model"],
        d_k=b["d_k"],
        d_v=b["d_v"],
        d_ff=0,
        n_head=b["n_head"],
        n_code=b["n_code"],
        n_layer=s["n_layer"],
        n_vocab=b["n_vocab"],
        pe_abs=s["pe_abs"],
        pe_lam=s["pe_lam"],
        p_dropemb=0.0,
        p_dropsin=0.0,
        p_dropres=0.0,
        p_droplyr=0.0,
        p_nucleus=0.9,
        c_beta=s["c_beta"],
        c_gamma=s["c_gamma"],
        e_tie=s["e_tie"],
        e_preln=s["e_preln"],
        e_scale=s["e_scale"],
    )
    config = TransformerConfig.create(**flags, is_train=True)
    model = Transformer(config)
    rng = jax.random.PRNGKey(seed)
    k_init, k_pert, k_tok = jax.random.split(rng, 3)
    tokens = jax.random.randint(k_tok, (n_seg, B, T), 0, b["n_vocab"], jnp.int32)
    doc_ids = jnp.zeros((B, T), jnp.int32)
    ones = jnp.ones((B, T), jnp.int32)

    def vq_spec():
        return VQSpec.create(
            n_device=jnp.array([1]), n_block_per_update=jnp.array([K]), loss_mask=ones
        )

    params = model.init(
        dict(params=k_init),
        inputs=tokens[0],
        doc_ids=doc_ids,
        state=Transformer.initial_state(config, B),
        vq_spec=vq_spec(),
    )["params"]
    params = _perturb(
        flax.core.unfreeze(params),
        k_pert,
        jax=jax,
        jnp=jnp,
        traverse_util=traverse_util,
        d_k=config.d_k,
    )

    # The official train state: the optimizer layout of launch.py get_tx
    # (its AdamW settings; the schedule and clipping hold no arrays here).
    labels = flattened_traversal(
        lambda path, _: "main" if not path[-1].startswith("c_") else "codebook"
    )
    tx = optax.multi_transform(
        {
            "main": optax.adamw(1e-3, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.0),
            "codebook": optax.sgd(learning_rate=1.0),
        },
        param_labels=labels,
    )
    state = TrainState.create(apply_fn=None, params=params, tx=tx)
    state = state.replace(step=STEP)

    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    save_checkpoint(
        target=state, save_dir=out_dir, prefix="checkpoint", step=STEP, keep=1
    )

    apply = jax.jit(
        lambda p, x, st: model.apply(
            {"params": p}, inputs=x, doc_ids=doc_ids, state=st, vq_spec=vq_spec()
        )
    )
    attn_state = Transformer.initial_state(config, B)
    logprobs = []
    for i in range(n_seg):
        outputs = apply(params, tokens[i], attn_state)
        logprobs.append(np.asarray(outputs["logprobs"]))
        attn_state = outputs["attn_state"]

    meta = dict(
        official_flags=flags,
        step=STEP,
        seed=seed,
        official_commit=commit,
        versions={
            name: importlib.metadata.version(name)
            for name in (
                "jax",
                "jaxlib",
                "flax",
                "orbax-checkpoint",
                "tensorstore",
                "optax",
                "numpy",
            )
        }
        | dict(python=sys.version.split()[0]),
        flax_use_orbax_checkpointing=bool(flax.config.flax_use_orbax_checkpointing),
        dtype="float32",
        backend=jax.default_backend(),
    )
    path = os.path.join(out_dir, "expected.npz")
    np.savez_compressed(
        path,
        inputs=np.asarray(tokens),
        logprobs=np.stack(logprobs),
        meta=np.array(json.dumps(meta, sort_keys=True)),
    )
    for root, _, files in os.walk(out_dir):
        for f in files:
            p = os.path.join(root, f)
            print(f"wrote {p} ({os.path.getsize(p)} bytes)")


if __name__ == "__main__":
    main()
