"""Weights in and out: `save_model` / `load_model` (safetensors with the
config in its metadata) and `load_official` (a checkpoint written by the
official Transformer-VQ code, `tests/fixtures/official_checkpoint`, made by
`tests/golden/make_official_checkpoint.py`)."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
import safetensors.numpy

import tvq_eqx
from tvq_eqx import TransformerConfig
from tvq_eqx.train import (
    OfficialCheckpointError,
    WeightsError,
    official_model_config,
    read_model_config,
    read_official_checkpoint,
)
from tvq_eqx.train._official import official_param_table, unused_official

OFFICIAL = Path(__file__).parent / "fixtures" / "official_checkpoint"
# The golden tests' bound (tests/test_golden.py: RTOL, ATOL_RMS).
RTOL, ATOL_RMS = 1e-5, 1e-9

SMALL = dict(n_vocab=13, d_model=16, d_k=6, d_v=4, n_head=2, n_code=5, block_len=4)


def _model(**overrides) -> tvq_eqx.Transformer:
    config = TransformerConfig(**dict(SMALL, **overrides))
    model = tvq_eqx.Transformer(config, key=jax.random.key(3))
    # Move every array off its init value (zeros, ones) so a mix-up shows;
    # the EMA tally stays a whole number, as the model checks.
    flat, treedef = jax.tree_util.tree_flatten_with_path(model)
    keys = iter(jax.random.split(jax.random.key(4), len(flat)))
    moved = [
        (x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype)).astype(x.dtype)
        if _is_float(x) and "ema_tally" not in jax.tree_util.keystr(path)
        else x
        for path, x in flat
    ]
    return jax.tree.unflatten(treedef, moved)


def _is_float(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)


def _logprobs(model, tokens):
    state = model.init_state(tokens.shape[0])
    mask = jnp.ones(tokens.shape, jnp.float32)
    out, _, _ = model(tokens, state, mask=mask)
    return np.asarray(out)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 13, (2, 8)), jnp.int32)


# ------------------------------------------------------------ save / load --


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(param_dtype="bfloat16", tie_embeddings=True, abs_pe=True)],
    ids=["float32", "bfloat16-tied-abs_pe"],
)
def test_roundtrip_is_exact(tmp_path, overrides):
    model = _model(**overrides)
    path = tmp_path / "model.safetensors"
    tvq_eqx.save_model(path, model)
    loaded = tvq_eqx.load_model(path)
    assert loaded.config == model.config
    a, b = jax.tree.leaves(model), jax.tree.leaves(loaded)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(_logprobs(model, TOKENS), _logprobs(loaded, TOKENS))


def test_file_names_and_metadata(tmp_path):
    model = _model()
    path = tmp_path / "model.safetensors"
    tvq_eqx.save_model(path, model)
    tensors = safetensors.numpy.load_file(path)
    # Readable names; per-layer arrays stacked with a leading layer axis.
    assert tensors["embedding.weight"].shape == (13, 16)
    assert tensors["layers.units.0.w_q"].shape == (2, 16, 12)
    assert tensors["layers.units.1.quantizer.codebook_sum"].shape == (2, 2, 5, 6)
    np.testing.assert_array_equal(
        tensors["layers.units.1.w_o"][1], np.asarray(model.layers[1].units[1].w_o)
    )
    assert read_model_config(path) == model.config
    meta = tvq_eqx.train._weights.read_metadata(path)
    assert meta["format"] == "tvq-eqx" and meta["format_version"] == "1"
    assert json.loads(meta["config"])["d_k"] == 6


def test_no_pickle(tmp_path, monkeypatch):
    """The file is a safetensors header (JSON) plus raw tensor bytes and
    nothing else; loading never calls pickle."""
    model = _model()
    path = tmp_path / "model.safetensors"
    tvq_eqx.save_model(path, model)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    sizes = [
        int(np.prod(v["shape"])) * 4 for k, v in header.items() if k != "__metadata__"
    ]
    assert len(raw) == 8 + n + sum(sizes)  # every float32 tensor, no other data

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, no_pickle)
    monkeypatch.setattr(np, "load", no_pickle)
    tvq_eqx.load_model(path)


def _rewrite(path, change):
    tensors = safetensors.numpy.load_file(path)
    meta = tvq_eqx.train._weights.read_metadata(path)
    change(tensors)
    safetensors.numpy.save_file(tensors, path, metadata=meta)


def test_bad_name_shape_dtype_are_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    tvq_eqx.save_model(path, _model())

    def rename(t):
        t["layers.units.0.w_qq"] = t.pop("layers.units.0.w_q")

    _rewrite(path, rename)
    with pytest.raises(WeightsError, match=r"missing tensors \['layers.units.0.w_q'\]"):
        tvq_eqx.load_model(path)
    with pytest.raises(
        WeightsError, match=r"unexpected tensors \['layers.units.0.w_qq'"
    ):
        tvq_eqx.load_model(path)

    tvq_eqx.save_model(path, _model())
    _rewrite(path, lambda t: t.update({"head.bias": np.zeros((14,), np.float32)}))
    with pytest.raises(WeightsError, match=r"'head.bias' has shape \(14,\).*\(13,\)"):
        tvq_eqx.load_model(path)

    tvq_eqx.save_model(path, _model())
    _rewrite(path, lambda t: t.update({"head.bias": t["head.bias"].astype(np.float16)}))
    with pytest.raises(WeightsError, match=r"'head.bias' .* dtype float16.*float32"):
        tvq_eqx.load_model(path)


def test_config_change_that_alters_shapes_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    tvq_eqx.save_model(path, _model())
    # block_len changes no array: allowed, same weights
    loaded = tvq_eqx.load_model(path, block_len=2)
    assert loaded.config.block_len == 2
    with pytest.raises(WeightsError, match="n_code|codebook"):
        tvq_eqx.load_model(path, n_code=7)


def test_not_a_weights_file(tmp_path):
    path = tmp_path / "other.safetensors"
    safetensors.numpy.save_file({"x": np.zeros(3, np.float32)}, path)
    with pytest.raises(WeightsError, match="no __metadata__"):
        tvq_eqx.load_model(path)
    safetensors.numpy.save_file(
        {"x": np.zeros(3, np.float32)}, path, metadata={"format": "pt"}
    )
    with pytest.raises(WeightsError, match="not a tvq-eqx weights file"):
        tvq_eqx.load_model(path)
    (tmp_path / "short").write_bytes(b"abc")
    with pytest.raises(WeightsError, match="too short"):
        tvq_eqx.load_model(tmp_path / "short")


def test_missing_safetensors_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ImportError, match=r"tvq-eqx\[weights\]"):
        tvq_eqx.save_model(tmp_path / "m.safetensors", _model())


# ------------------------------------------------------- official import --


def _expected():
    with np.load(OFFICIAL / "expected.npz") as f:
        data = {k: f[k] for k in f.files}
    return data, json.loads(str(data.pop("meta")))


def _official_errors(model, data) -> tuple[float, float]:
    """Relative (norm) and max abs error of our log-probs against the
    official ones, two consecutive segments with the carried state."""
    inputs, ref = data["inputs"], data["logprobs"].astype(np.float64)
    state = model.init_state(inputs.shape[1])
    out = []
    for s in range(inputs.shape[0]):
        x = jnp.asarray(inputs[s])
        lp, state, _ = model(x, state, mask=jnp.ones(x.shape, jnp.float32))
        out.append(np.asarray(lp, np.float64))
    out = np.stack(out)
    assert np.isfinite(out).all()
    err = np.linalg.norm(out - ref)
    bound = RTOL * np.linalg.norm(ref) + ATOL_RMS * np.sqrt(ref.size)
    assert err <= bound, (err, bound)
    return err / np.linalg.norm(ref), float(np.abs(out - ref).max())


def test_official_checkpoint_gives_official_logprobs(monkeypatch):
    # Read without flax or orbax: importing either fails from here on.
    for name in ("flax", "orbax", "orbax.checkpoint", "tensorstore"):
        monkeypatch.setitem(sys.modules, name, None)
    data, meta = _expected()
    assert len(meta["official_commit"]) == 40, meta["official_commit"]
    assert meta["versions"]["flax"] == "0.6.11" and meta["flax_use_orbax_checkpointing"]
    model = tvq_eqx.load_official(OFFICIAL, meta["official_flags"])
    assert model.config == official_model_config(meta["official_flags"])
    rel, max_abs = _official_errors(model, data)
    print(f"official checkpoint: rel {rel:.3g}, max abs {max_abs:.3g}")
    # the flags' n_vocab may be left out: it is read off the embedding
    flags = {k: v for k, v in meta["official_flags"].items() if k != "n_vocab"}
    again = tvq_eqx.load_official(OFFICIAL / "checkpoint_1000", flags)
    assert again.config.n_vocab == model.config.n_vocab


def test_official_model_config_of_the_launch_flags():
    """The docs' example: an official script's flags give the preset's model
    (the other flags, optimizer and loop, are ignored)."""
    flags = tvq_eqx.train.OFFICIAL_LAUNCH["enwik8"]
    config = official_model_config(dict(flags, n_vocab=256))
    assert config == tvq_eqx.train.PRESETS["enwik8"].model
    with pytest.raises(ValueError, match="n_vocab"):
        official_model_config(flags)
    with pytest.raises(ValueError, match="'agg_cache'"):
        official_model_config(
            {k: v for k, v in flags.items() if k != "agg_cache"} | {"n_vocab": 256}
        )


def test_official_checkpoint_holds_what_the_mapping_reads():
    _, meta = _expected()
    params = read_official_checkpoint(OFFICIAL)
    config = official_model_config(meta["official_flags"])
    names = {name for name, _, _ in official_param_table(config)}
    assert set(params) == names | unused_official(config)
    assert params["token_embedder/embs"].dtype == np.float32


def _legacy_flax_file(params: dict, path: Path, chunk: str | None = None) -> None:
    """`params` written as flax's own (non-Orbax) msgpack checkpoint file:
    the train state's state dict, arrays as extension type 1, optionally
    one array in flax's chunked form (as arrays over 1 GiB are written)."""

    def ext(a):
        a = np.ascontiguousarray(a)
        body = msgpack.packb((a.shape, a.dtype.name, a.tobytes()), use_bin_type=True)
        return msgpack.ExtType(1, body)

    tree: dict = {}
    for name, value in params.items():
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        if name == chunk:
            flat = value.reshape(-1)
            node[leaf] = {
                "__msgpack_chunked_array__": True,
                "shape": {str(i): n for i, n in enumerate(value.shape)},
                "chunks": {"0": flat[:7], "1": flat[7:]},
            }
        else:
            node[leaf] = value
    state = {"step": 5, "params": tree, "opt_state": {"0": None}}
    path.write_bytes(msgpack.packb(state, default=ext, strict_types=True))


def test_legacy_flax_file_and_chunked_arrays(tmp_path):
    data, meta = _expected()
    params = read_official_checkpoint(OFFICIAL)
    chunk = "transformer_layers_1/scanned_attn2/kvg_proj/kernel"
    _legacy_flax_file(params, tmp_path / "checkpoint_5", chunk=chunk)
    (tmp_path / "checkpoint_4").write_bytes(b"older, never read")
    again = read_official_checkpoint(tmp_path)  # the newest step
    assert set(again) == set(params)
    for k in params:
        np.testing.assert_array_equal(again[k], params[k])
    _official_errors(tvq_eqx.load_official(tmp_path, meta["official_flags"]), data)


def test_official_shape_mismatch_names_the_parameter():
    _, meta = _expected()
    flags = dict(meta["official_flags"], n_code=4)
    with pytest.raises(
        OfficialCheckpointError,
        match=r"'transformer_layers_0/scanned_attn1/quantizer/c_sum' has shape "
        r"\(2, 5, 6\); the model of this config wants \(2, 4, 6\)",
    ):
        tvq_eqx.load_official(OFFICIAL, flags)
    # other heads: the projections no longer fit
    flags = dict(meta["official_flags"], n_head=1, d_k=12)
    with pytest.raises(OfficialCheckpointError, match=r"kvg_proj/kernel' has shape"):
        tvq_eqx.load_official(OFFICIAL, flags)
    flags = dict(meta["official_flags"], e_preln=1)
    with pytest.raises(OfficialCheckpointError, match=r"missing.*'out_ln/g'"):
        tvq_eqx.load_official(OFFICIAL, flags)
    flags = dict(meta["official_flags"], n_layer=1)
    with pytest.raises(OfficialCheckpointError, match="transformer_layers_1/"):
        tvq_eqx.load_official(OFFICIAL, flags)


def test_official_bad_files(tmp_path):
    with pytest.raises(OfficialCheckpointError, match="no official checkpoint"):
        read_official_checkpoint(tmp_path / "nowhere")
    with pytest.raises(OfficialCheckpointError, match="holds no official checkpoint"):
        read_official_checkpoint(tmp_path)
    newer = tmp_path / "newer" / "checkpoint_7"
    newer.mkdir(parents=True)
    (newer / "manifest.ocdbt").write_bytes(b"")
    with pytest.raises(OfficialCheckpointError, match="newer Orbax.*msgpack_serialize"):
        read_official_checkpoint(newer.parent)
    (tmp_path / "checkpoint").write_bytes(b"\xc1 not msgpack")
    with pytest.raises(OfficialCheckpointError, match="not flax msgpack"):
        read_official_checkpoint(tmp_path)
    # Orbax leaves arrays it writes with tensorstore as placeholders
    placeholder = {"params": {"token_embedder": {"embs": "PLACEHOLDER://x"}}}
    (tmp_path / "checkpoint").write_bytes(msgpack.packb(placeholder))
    with pytest.raises(
        OfficialCheckpointError, match="token_embedder/embs.*tensorstore"
    ):
        read_official_checkpoint(tmp_path)
    bad = msgpack.ExtType(1, msgpack.packb(((2,), "object", b"\0" * 16)))
    (tmp_path / "checkpoint").write_bytes(msgpack.packb({"params": {"a": bad}}))
    with pytest.raises(OfficialCheckpointError, match="unsupported dtype 'object'"):
        read_official_checkpoint(tmp_path)
