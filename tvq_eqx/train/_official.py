"""Parameters of the official Transformer-VQ code (Flax) as a tvq_eqx model.

The one home of the parameter mapping: `tests/test_golden.py` checks it
against the official modules (outputs, states, gradients) and
`load_official` uses it on the official code's checkpoints.

How the official parameters map (paths are the official Flax paths joined
with "/"): by identity, except that `u` and `v` are flat `[n_head * d_k]`
officially and `[n_head, d_k]` here, and that our codebook lives in the
unscaled key space (keys after the q/k norm) while the official
`LearnableVQ` works in the pre-scaled space `k * d_k^-1/4`, so
`codebook_sum = c_sum * d_k^(1/4)`. Official layer `i`
(`transformer_layers_{i}/scanned_attn{1,2}`) is index `i` of our stacked
layer axis. Our quantizers' `ema_tally` (no official counterpart) starts at
its initial 1. With an untied head (`e_tie=0`) the official model still
creates `token_embedder/bias_out` but never reads it; it is not loaded.

The official launch script saves a flax `TrainState` with
`flax.training.checkpoints.save_checkpoint_multiprocess` (flax 0.6.11, its
pinned version, saves through Orbax by default): a folder
`checkpoint_<step>/` whose file `checkpoint` holds every array of a one-host
run (fully replicated arrays are aggregated into it) in flax's msgpack
encoding. Without Orbax (older flax, or `flax_use_orbax_checkpointing`
off) the checkpoint is the file `checkpoint_<step>` itself, in the same
encoding. Newer flax and Orbax (flax 0.8.5 with orbax-checkpoint 0.6.4,
say) write tensorstore/OCDBT files instead; the error says how to convert
them to the msgpack form. `read_official_checkpoint` reads either msgpack
form with the `msgpack`
package alone (no flax, no pickle): maps and lists as they are, arrays as
msgpack extension type 1 (`(shape, dtype name, C-order bytes)`, itself
msgpack), numpy scalars as type 3, complex numbers as type 2, and arrays
over 1 GiB split into `{"__msgpack_chunked_array__": True, "shape": {...},
"chunks": {...}}`. Arrays Orbax writes with tensorstore instead (sharded
across hosts) are not read; the error names them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._config import TransformerConfig
from ..nn import LayerStack, Transformer, VectorQuantizer, stack_layers
from ._presets import official_model_config


class OfficialCheckpointError(ValueError):
    """An official checkpoint that cannot be read, or whose parameters do
    not fit the model they are loaded into."""


def codebook_scale(d_k: int) -> float:
    """Our codebook = official codebook * this (module docstring)."""
    return d_k**0.25


# (official path inside an attention unit, getter on our VQAttention, kind):
# "param" maps as is, "flat" is flat officially (reshaped to ours),
# "codebook" is also scaled by `codebook_scale`.
Getter = Callable[[Any], Any]
UNIT_PARAMS: list[tuple[str, Getter, str]] = [
    ("input_ln/g", lambda u: u.norm.weight, "param"),
    ("input_ln/b", lambda u: u.norm.bias, "param"),
    ("q_proj/kernel", lambda u: u.w_q, "param"),
    ("kvg_proj/kernel", lambda u: u.w_kvg, "param"),
    ("res_proj/kernel", lambda u: u.w_o, "param"),
    ("r_proj/kernel", lambda u: u.rel_bias.w_r, "param"),
    ("u", lambda u: u.rel_bias.u, "flat"),
    ("v", lambda u: u.rel_bias.v, "flat"),
    ("quantizer/c_sum", lambda u: u.quantizer.codebook_sum, "codebook"),
    ("quantizer/c_count", lambda u: u.quantizer.codebook_count, "param"),
]


def official_param_table(config: TransformerConfig) -> list[tuple[str, Getter, str]]:
    """(official path, getter on our `Transformer`, kind) of every official
    parameter the model of `config` reads; `m.layers[i]` is layer `i`."""
    table: list[tuple[str, Getter, str]] = [
        ("token_embedder/embs", lambda m: m.embedding.weight, "param")
    ]
    if config.tie_embeddings:
        table.append(("token_embedder/bias_out", lambda m: m.head.bias, "param"))
    else:
        table += [
            ("out_proj/kernel", lambda m: m.head.weight, "param"),
            ("out_proj/bias", lambda m: m.head.bias, "param"),
        ]
    if config.output_norm:
        table += [
            ("out_ln/g", lambda m: m.out_norm.weight, "param"),
            ("out_ln/b", lambda m: m.out_norm.bias, "param"),
        ]
    if config.abs_pe:
        table.append(
            ("position_embedder/scale", lambda m: m.position_embedding.scale, "param")
        )
    for i in range(config.n_layer):
        for j in range(2):
            prefix = f"transformer_layers_{i}/scanned_attn{j + 1}/"
            for name, get, kind in UNIT_PARAMS:
                table.append(
                    (
                        prefix + name,
                        lambda m, i=i, j=j, get=get: get(m.layers[i].units[j]),
                        kind,
                    )
                )
    return table


def unused_official(config: TransformerConfig) -> set[str]:
    """Official parameters the official model never reads in the setting of
    `config` (they have no counterpart here)."""
    return set() if config.tie_embeddings else {"token_embedder/bias_out"}


def to_ours(name: str, value: np.ndarray, target: Any, kind: str, d_k: int):
    """Official parameter `name` as our array shaped and typed as `target`."""
    value = np.asarray(value)
    same = tuple(value.shape) == tuple(target.shape)
    if not same and not (kind == "flat" and value.size == int(np.prod(target.shape))):
        raise OfficialCheckpointError(
            f"official parameter {name!r} has shape {tuple(value.shape)}; the "
            f"model of this config wants {tuple(target.shape)}"
        )
    if not np.issubdtype(value.dtype, np.floating) and value.dtype != jnp.bfloat16:
        raise OfficialCheckpointError(
            f"official parameter {name!r} has dtype {value.dtype}, not a float"
        )
    value = value.reshape(target.shape)
    if kind == "codebook":
        value = value.astype(np.float64) * codebook_scale(d_k)
    return jnp.asarray(value, target.dtype)


def build_from_official(
    cls: type,
    config: TransformerConfig,
    table: list[tuple[str, Getter, str]],
    params: Mapping[str, Any],
    skip: set[str] | frozenset[str] = frozenset(),
):
    """Module `cls(config)` (a `Transformer`, or one `VQAttention` with
    `UNIT_PARAMS`) with every parameter set from the official `params`
    (flat, "/"-joined paths) by `table`.

    Built from its shape skeleton (no random init, nothing compiled). An
    official parameter with no counterpart here (other than `skip`), one of
    ours with no official counterpart, or a shape that does not fit raises
    an `OfficialCheckpointError` naming it. Floating parameters take the
    dtype of the model (`config.param_dtype`).
    """
    skeleton = eqx.filter_eval_shape(cls, config, key=jax.random.key(0))
    # Our layers are stacked along a leading layer axis, the official ones
    # are separate: fill an unrolled skeleton (a tuple of per-layer
    # skeletons, so `m.layers[i]` is a node `tree_at` can set), then stack.
    stacked = isinstance(getattr(skeleton, "layers", None), LayerStack)
    if stacked:
        skeleton = eqx.tree_at(lambda m: m.layers, skeleton, tuple(skeleton.layers))
    missing, getters, values = [], [], []
    for name, get, kind in table:
        try:
            leaf = get(skeleton)
        except AttributeError:
            leaf = None
        if leaf is None or name not in params:
            missing.append(name)
            continue
        getters.append(get)
        values.append(to_ours(name, params[name], leaf, kind, config.d_k))
    if missing:
        raise OfficialCheckpointError(
            f"official parameters missing (or with no place in {cls.__name__}): "
            f"{missing}"
        )
    extra = sorted(set(params) - {name for name, _, _ in table} - set(skip))
    if extra:
        raise OfficialCheckpointError(
            f"official parameters with no counterpart in {cls.__name__} of this "
            f"config: {extra}"
        )
    module = eqx.tree_at(lambda m: [g(m) for g in getters], skeleton, values)
    module = _fill_ema_tallies(module)
    unset = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(module)[0]
        if isinstance(leaf, jax.ShapeDtypeStruct)
    ]
    if unset:
        raise OfficialCheckpointError(
            f"{cls.__name__} parameters with no official counterpart: {unset}"
        )
    if stacked:
        module = eqx.tree_at(lambda m: m.layers, module, stack_layers(module.layers))
    return module


def _fill_ema_tallies(module):
    """Every quantizer's `ema_tally` (ours only) set to its initial 1."""

    def fill(q):
        if not isinstance(q.ema_tally, jax.ShapeDtypeStruct):
            return q
        ones = jnp.ones(q.ema_tally.shape, q.ema_tally.dtype)
        return eqx.tree_at(lambda q: q.ema_tally, q, ones)

    is_q = lambda x: isinstance(x, VectorQuantizer)
    return jax.tree.map(lambda x: fill(x) if is_q(x) else x, module, is_leaf=is_q)


def from_official_params(
    params: Mapping[str, Any], config: TransformerConfig
) -> Transformer:
    """The `Transformer` of `config` holding the official `params` (flat,
    "/"-joined official paths, e.g. from `read_official_checkpoint`)."""
    return build_from_official(
        Transformer,
        config,
        official_param_table(config),
        params,
        skip=unused_official(config),
    )


# --------------------------------------------------------- the file format --

_NDARRAY, _COMPLEX, _NPSCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"
_STEP_NAME = re.compile(r"^checkpoint_(\d+)$")


def _msgpack():
    try:
        import msgpack
    except ImportError as e:
        raise ImportError(
            "reading official checkpoints needs the msgpack package: "
            "pip install 'tvq-eqx[weights]'"
        ) from e
    return msgpack


def _array_from_ext(data: bytes) -> np.ndarray:
    shape, dtype_name, buffer = _msgpack().unpackb(data, raw=True)
    name = dtype_name.decode() if isinstance(dtype_name, bytes) else str(dtype_name)
    if name == "bfloat16":
        dtype = np.dtype(jnp.bfloat16)
    else:
        try:
            dtype = np.dtype(name)
        except TypeError:
            raise OfficialCheckpointError(f"array of unknown dtype {name!r}") from None
        if dtype.kind not in "biufc":  # object, structured, strings: refused
            raise OfficialCheckpointError(f"array of unsupported dtype {name!r}")
    shape = tuple(int(n) for n in shape)
    if len(buffer) != int(np.prod(shape)) * dtype.itemsize:
        raise OfficialCheckpointError(
            f"array of shape {shape} dtype {name} holds {len(buffer)} bytes"
        )
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _NDARRAY:
        return _array_from_ext(data)
    if code == _NPSCALAR:
        return _array_from_ext(data)[()]
    if code == _COMPLEX:
        re_, im = _msgpack().unpackb(data)
        return complex(re_, im)
    raise OfficialCheckpointError(f"unknown msgpack extension type {code}")


def _ordered_values(d: Any, what: str) -> list:
    """The values of a flax tuple-as-dict (`{"0": a, "1": b}`) in order."""
    if isinstance(d, list):
        return d
    if not isinstance(d, dict):
        raise OfficialCheckpointError(f"chunked array: {what} is not a map")
    return [d[k] for k in sorted(d, key=int)]


def _unchunk(tree: Any) -> Any:
    if isinstance(tree, dict):
        if tree.get(_CHUNKED):
            shape = tuple(int(n) for n in _ordered_values(tree["shape"], "shape"))
            chunks = _ordered_values(tree["chunks"], "chunks")
            return np.concatenate([np.ravel(c) for c in chunks]).reshape(shape)
        return {k: _unchunk(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_unchunk(v) for v in tree]
    return tree


def decode_flax_msgpack(data: bytes) -> Any:
    """The tree (dicts, lists, numpy arrays, numbers) in flax's msgpack
    encoding `data` (module docstring); no flax needed."""
    msgpack = _msgpack()
    try:
        tree = msgpack.unpackb(
            data, ext_hook=_ext_hook, raw=False, strict_map_key=False
        )
    except OfficialCheckpointError:
        raise
    except Exception as e:  # msgpack's own errors: corrupt or not msgpack
        raise OfficialCheckpointError(
            f"not flax msgpack data: {type(e).__name__}: {e}"
        ) from None
    return _unchunk(tree)


def _checkpoint_file(path: Path) -> Path:
    """The msgpack file of an official checkpoint at `path`: the file
    itself, `checkpoint` inside an Orbax checkpoint folder, or, in a folder
    of checkpoints, that of the newest `checkpoint_<step>`."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise OfficialCheckpointError(f"no official checkpoint at {path}")
    if (path / "checkpoint").is_file():
        return path / "checkpoint"
    steps = [
        (int(m.group(1)), p)
        for p in path.iterdir()
        if (m := _STEP_NAME.match(p.name)) is not None
    ]
    if steps:
        return _checkpoint_file(max(steps)[1])
    if (path / "manifest.ocdbt").exists() or (path / "_METADATA").exists():
        raise OfficialCheckpointError(
            f"{path} was written by a newer Orbax (tensorstore/OCDBT arrays, as "
            "flax >= 0.7 saves), which this reader does not read; convert it where "
            "flax is installed: open(out, 'wb').write(flax.serialization."
            "msgpack_serialize(flax.training.checkpoints.restore_checkpoint(dir, "
            "target=None))), then load that file (docs/training.md)"
        )
    raise OfficialCheckpointError(
        f"{path} holds no official checkpoint (no file 'checkpoint', no "
        "'checkpoint_<step>')"
    )


def _flatten(tree: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _flatten(v, f"{prefix}{k}/", out)
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            _flatten(v, f"{prefix}{i}/", out)
    elif tree is not None:
        out[prefix[:-1]] = tree


def read_official_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The parameters of an official checkpoint as numpy arrays, keyed by
    their official paths joined with "/" (`token_embedder/embs`,
    `transformer_layers_0/scanned_attn1/q_proj/kernel`, ...).

    `path` is a checkpoint (an Orbax folder `checkpoint_<step>` or a flax
    msgpack file) or the official `--out_checkpoint_dir` (its newest
    checkpoint is read). The train state's `params` are returned; its
    `step` and optimizer state are ignored. Needs the `weights` extra
    (msgpack); flax is not needed.
    """
    file = _checkpoint_file(Path(path))
    try:
        data = file.read_bytes()
    except OSError as e:
        raise OfficialCheckpointError(f"cannot read {file}: {e}") from None
    try:
        tree = decode_flax_msgpack(data)
    except OfficialCheckpointError as e:
        raise OfficialCheckpointError(f"{file}: {e}") from None
    if not isinstance(tree, dict):
        raise OfficialCheckpointError(f"{file} holds no map of parameters")
    params = tree.get("params", tree)
    flat: dict[str, Any] = {}
    _flatten(params, "", flat)
    bad = sorted(k for k, v in flat.items() if not isinstance(v, np.ndarray))
    if bad:
        raise OfficialCheckpointError(
            f"{file}: parameters {bad} are not stored in the msgpack file (Orbax "
            "keeps arrays sharded across hosts in tensorstore files, which this "
            "reader does not read)"
        )
    return flat


def load_official(
    path: str | os.PathLike, config: TransformerConfig | Mapping[str, Any]
) -> Transformer:
    """A `Transformer` holding the parameters of an official Transformer-VQ
    checkpoint (`read_official_checkpoint`: an official run's
    `--out_checkpoint_dir`, or one checkpoint in it).

    `config` is the model's `TransformerConfig`, or the official launch
    flags of the run that wrote it (`official_model_config`: `d_model`,
    `n_layer`, `agg_cache`, `e_tie`, ...; the whole `vars(args)` works;
    `n_vocab` defaults to the checkpoint's vocabulary). The official
    checkpoint does not store its flags, so they must be given: the switches
    (`agg_cache`, `e_tie`, `pe_lam`, `block_len`, ...) cannot be read off the
    arrays. Every parameter is checked: a missing or unexpected one, or one
    whose shape does not fit the config, raises an `OfficialCheckpointError`
    naming it. Needs the `weights` extra (msgpack).
    """
    params = read_official_checkpoint(path)
    if not isinstance(config, TransformerConfig):
        flags = dict(config)
        if "n_vocab" not in flags and "token_embedder/embs" in params:
            flags["n_vocab"] = int(params["token_embedder/embs"].shape[0])
        config = official_model_config(flags)
    return from_official_params(params, config)
