"""A model's weights as one safetensors file with its config (no pickle).

`save_model(path, model)` writes every array of a `Transformer` as a named
tensor and the `TransformerConfig` as JSON in the file's `__metadata__`;
`load_model(path)` rebuilds the model from that config and fills it, after
checking every tensor's name, shape and dtype against the fresh model.

Tensor names are the model's PyTree paths joined with dots, with the layer
stack's `stacked` step left out, e.g. `embedding.weight`,
`layers.units.0.w_q`, `layers.units.1.quantizer.codebook_sum`, `head.bias`.
The per-layer arrays stay stacked, as the model holds them: each `layers.*`
tensor has a leading `[n_layer]` axis (layer `i` is index `i`), so the file
maps one to one onto the model and loads without reshaping.

Metadata (all strings, as safetensors requires): `format` = `"tvq-eqx"`,
`format_version`, `config` (the `TransformerConfig` as a JSON object),
`tvq_eqx_version`, and `widened` (a JSON list of the tensors stored as
float32 that the model holds in bfloat16: the safetensors numpy API has no
bfloat16, and widening is exact, so they load back bit for bit).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._config import TransformerConfig
from ..nn import Transformer
from ._run_config import _check_keys, _nested_changes

FORMAT = "tvq-eqx"
# 1: stacked per-layer tensors named from the PyTree paths, config in metadata.
WEIGHTS_FORMAT_VERSION = 1


class WeightsError(ValueError):
    """A weights file that does not match the model it is loaded into, or
    that is not a tvq-eqx weights file."""


def _safetensors():
    try:
        import safetensors.numpy
    except ImportError as e:
        raise ImportError(
            "saving and loading weights needs the safetensors package: "
            "pip install 'tvq-eqx[weights]'"
        ) from e
    return safetensors.numpy


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tvq-eqx")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def _key_name(k: Any) -> str:
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    raise TypeError(f"unexpected PyTree key {k!r}")


def tensor_name(path: tuple) -> str:
    """The tensor name of a model leaf at PyTree `path` (see module docstring)."""
    parts = [_key_name(k) for k in path]
    # `layers.stacked.units...`: the LayerStack's one field adds nothing.
    if len(parts) > 1 and parts[0] == "layers" and parts[1] == "stacked":
        del parts[1]
    return ".".join(parts)


def _is_tensor(x: Any) -> bool:
    """An array leaf, or its ShapeDtypeStruct in a shape skeleton."""
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """(name, leaf) of every array (or ShapeDtypeStruct) leaf, in tree order."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if _is_tensor(leaf):
            out.append((tensor_name(path), leaf))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):  # a new module layout that collides
        raise AssertionError(f"tensor names are not unique: {names}")
    return out


def config_to_json(config: TransformerConfig) -> str:
    """`config` as a JSON object (every field; nested `PallasConfig` too)."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(text: str) -> TransformerConfig:
    """Inverse of `config_to_json`; unknown fields are a `WeightsError`
    naming them."""
    try:
        d = json.loads(text)
        _check_keys(TransformerConfig, d, "config")
        base = TransformerConfig()
        return dataclasses.replace(base, **_nested_changes(base, d))
    except (ValueError, TypeError) as e:
        raise WeightsError(f"weights metadata 'config' is not valid: {e}") from None


def save_model(path: str | os.PathLike, model: Any) -> None:
    """Write `model` (a `Transformer`) to `path` as safetensors, its config
    in the metadata (module docstring: names, layout, metadata).

    Every array of the model is written, parameters and the codebook's EMA
    counts alike, copied to the host first: each array must be fully
    addressable from this process (one host; `tvq-eqx export` loads a run's
    checkpoint on one process). Needs the `weights` extra (safetensors).
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a Transformer; got {type(model).__name__}")
    st = _safetensors()
    tensors: dict[str, np.ndarray] = {}
    widened: list[str] = []
    for name, leaf in _named_leaves(model):
        value = np.asarray(jax.device_get(leaf))
        if value.dtype == jnp.bfloat16:
            value = value.astype(np.float32)  # exact; see module docstring
            widened.append(name)
        # (np.ascontiguousarray would make a 0-d array 1-d)
        tensors[name] = np.array(value, order="C", copy=True)
    metadata = dict(
        format=FORMAT,
        format_version=str(WEIGHTS_FORMAT_VERSION),
        config=config_to_json(model.config),
        tvq_eqx_version=_package_version(),
        widened=json.dumps(widened),
    )
    st.save_file(tensors, os.fspath(path), metadata=metadata)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` of safetensors file `path` (read from its header
    alone: an 8-byte length, then that much JSON)."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise WeightsError(f"{p} is not a safetensors file (too short)")
            n = int.from_bytes(head, "little")
            if n > 100_000_000:
                raise WeightsError(f"{p} is not a safetensors file (header {n} B)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"cannot read the safetensors header of {p}: {e}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise WeightsError(f"{p} has no __metadata__ (not written by save_model)")
    return meta


def read_model_config(path: str | os.PathLike) -> TransformerConfig:
    """The `TransformerConfig` stored in weights file `path`."""
    meta = read_metadata(path)
    p = os.fspath(path)
    if meta.get("format") != FORMAT:
        raise WeightsError(
            f"{p} is not a tvq-eqx weights file (metadata format "
            f"{meta.get('format')!r}, expected {FORMAT!r})"
        )
    version = meta.get("format_version")
    if version != str(WEIGHTS_FORMAT_VERSION):
        raise WeightsError(
            f"{p} has weights format {version!r}; this tvq-eqx reads format "
            f"{WEIGHTS_FORMAT_VERSION}"
        )
    if "config" not in meta:
        raise WeightsError(f"{p} has no 'config' in its metadata")
    return config_from_json(meta["config"])


def load_model(path: str | os.PathLike, **config_changes: Any):
    """The `Transformer` saved by `save_model` at `path`.

    The model is rebuilt from the stored config (with `config_changes`
    applied, e.g. run-time settings like `implementation="xla"` or
    `block_len`; changes that alter array shapes fail the checks) and every
    array is checked against that fresh model: a tensor that is missing,
    unexpected, or of another shape or dtype raises a `WeightsError` naming
    it. Needs the `weights` extra (safetensors).
    """
    p = os.fspath(path)
    config = read_model_config(p)
    if config_changes:
        config = config.replace(**config_changes)
    widened = set(json.loads(read_metadata(p).get("widened", "[]")))
    try:
        tensors = _safetensors().load_file(p)
    except Exception as e:  # safetensors' own error types vary by version
        raise WeightsError(f"cannot read {p}: {type(e).__name__}: {e}") from None
    skeleton = eqx.filter_eval_shape(Transformer, config, key=jax.random.key(0))
    wanted = _named_leaves(skeleton)
    missing = [n for n, _ in wanted if n not in tensors]
    extra = sorted(set(tensors) - {n for n, _ in wanted})
    if missing or extra:
        raise WeightsError(
            f"{p} does not match the model of its config: missing tensors "
            f"{missing}, unexpected tensors {extra}"
        )
    values = []
    for name, leaf in wanted:
        value = tensors[name]
        want_dtype = np.dtype(leaf.dtype)
        stored_dtype = np.dtype(np.float32) if name in widened else want_dtype
        if tuple(value.shape) != tuple(leaf.shape) or value.dtype != stored_dtype:
            raise WeightsError(
                f"{p}: tensor {name!r} has shape {tuple(value.shape)} dtype "
                f"{value.dtype}; the model wants shape {tuple(leaf.shape)} dtype "
                f"{stored_dtype}"
            )
        values.append(jnp.asarray(value.astype(want_dtype, copy=False)))
    leaves, treedef = jax.tree.flatten(skeleton)
    it = iter(values)
    filled = [next(it) if _is_tensor(x) else x for x in leaves]
    return jax.tree.unflatten(treedef, filled)
