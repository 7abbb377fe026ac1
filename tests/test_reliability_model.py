"""Reliability of the model, the loss and the config on unusual but valid
inputs (uint8 tokens, ignore-index targets, numpy scalars and dtype objects
in the config, no state) and on bad ones (out-of-range ids, negative or
misshapen masks, the stateless "quadratic" implementation), and composition
into user code: `jax.shard_map` with its default checks, and a batch-sharded
`jit` that XLA compiles without rematerialising."""

import dataclasses
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _inputs import user_call
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tvq_eqx
from tvq_eqx._checks import out_of_range

TINY = dict(d_model=16, d_k=4, d_v=8, n_head=2, n_code=8, n_layer=1, block_len=8)


@pytest.fixture(scope="module")
def model():
    return tvq_eqx.Transformer(tvq_eqx.TransformerConfig(**TINY), key=jax.random.key(0))


@pytest.fixture(scope="module")
def batch():
    """Four rows of 16 byte tokens, ids 0..255 (uint8 covers them all)."""
    toks = np.asarray(jax.random.randint(jax.random.key(1), (4, 17), 0, 256))
    mask = np.ones((4, 16), np.float32)
    mask[1, 10:] = 0.0
    return dict(inputs=toks[:, :-1], targets=toks[:, 1:], loss_mask=mask)


loss_jit = eqx.filter_jit(tvq_eqx.loss_fn)
# Log-probs and new state (one compile per token dtype, shared by the tests).
forward_jit = eqx.filter_jit(lambda m, t, s: m(t, s)[:2])


def as_dtype(batch, dtype):
    return dict(
        batch,
        inputs=jnp.asarray(batch["inputs"], dtype),
        targets=jnp.asarray(batch["targets"], dtype),
        loss_mask=jnp.asarray(batch["loss_mask"]),
    )


# ---- token dtypes ------------------------------------------------------------


def test_uint8_tokens_give_the_same_logprobs_and_loss_as_int32(model, batch):
    # Ids up to 255: `uint8 >= 256` wrapped to `>= 0` and rejected them all.
    assert batch["inputs"].max() > 127
    state = model.init_state(4)
    ref_loss, ref_aux = loss_jit(model, as_dtype(batch, jnp.int32), state)
    loss, aux = loss_jit(model, as_dtype(batch, jnp.uint8), state)
    assert float(loss) == float(ref_loss)
    assert float(aux["metrics"]["lm_loss_sum"]) == float(
        ref_aux["metrics"]["lm_loss_sum"]
    )
    ref, _ = forward_jit(model, jnp.asarray(batch["inputs"], jnp.int32), state)
    got, _ = forward_jit(model, jnp.asarray(batch["inputs"], jnp.uint8), state)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    # data.load_bytes gives uint8 arrays: they go straight in.
    got_np, _ = forward_jit(model, np.asarray(batch["inputs"], np.uint8), state)
    np.testing.assert_array_equal(np.asarray(got_np), np.asarray(ref))


def test_int8_tokens_equal_int32_and_negative_ids_are_rejected(model, batch):
    state = model.init_state(4)
    small = jnp.asarray(batch["inputs"] % 128)
    ref, _ = forward_jit(model, small.astype(jnp.int32), state)
    got, _ = forward_jit(model, small.astype(jnp.int8), state)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    with pytest.raises(Exception, match=r"token ids must be in \[0, n_vocab=256\)"):
        forward_jit(model, small.astype(jnp.int8).at[2, 3].set(-1), state)


@pytest.mark.parametrize(
    "dtype,ids,n_vocab,want",
    [
        ("uint8", [0, 255], 256, None),  # no uint8 value is out of range
        ("uint8", [99, 100, 255], 100, [False, True, True]),
        ("int8", [-1, 0, 127], 256, [True, False, False]),
        ("int8", [-128, 5, 6], 6, [True, False, True]),
        ("uint16", [255, 256, 65535], 256, [False, True, True]),
        ("int32", [-1, 255, 256], 256, [True, False, True]),
        ("int32", [2**30, 3], 256, [True, False]),
    ],
)
def test_out_of_range_compares_in_the_ids_dtype_without_wrapping(
    dtype, ids, n_vocab, want
):
    bad = out_of_range(jnp.asarray(ids, dtype), n_vocab)
    if want is None:
        assert bad is None
    else:
        np.testing.assert_array_equal(np.asarray(bad), want)


# ---- loss_mask and ignore-index targets --------------------------------------


def test_ignore_index_targets_under_a_zero_mask_are_accepted(model, batch):
    state = model.init_state(4)
    b = as_dtype(batch, jnp.int32)
    masked = b["loss_mask"] == 0
    assert masked.any()
    ref, ref_aux = loss_jit(model, b, state)
    for fill in (-1, 0, 255, 10_000):
        t = jnp.where(masked, fill, b["targets"])
        loss, aux = loss_jit(model, dict(b, targets=t), state)
        assert float(loss) == float(ref), fill
        assert float(aux["metrics"]["lm_loss_sum"]) == float(
            ref_aux["metrics"]["lm_loss_sum"]
        )
    # The same ids under a nonzero mask are still rejected.
    for fill in (-1, 256):
        t = b["targets"].at[0, 0].set(fill)
        with pytest.raises(Exception, match=r"batch\['targets'\] ids must be in"):
            loss_jit(model, dict(b, targets=t), state)


@pytest.mark.parametrize("bad_value", [-1.0, float("nan"), float("inf")])
def test_negative_or_non_finite_loss_mask_is_rejected(model, batch, bad_value):
    # A negative weight made the loss negative; NaN and inf poison it.
    b = as_dtype(batch, jnp.int32)
    b["loss_mask"] = b["loss_mask"].at[3, 5].set(bad_value)
    with pytest.raises(Exception, match=r"batch\['loss_mask'\] entries must be"):
        loss_jit(model, b, model.init_state(4))
    with pytest.raises(Exception, match=r"mask entries must be finite and >= 0"):
        model(b["inputs"], model.init_state(4), mask=b["loss_mask"])


def test_misshapen_masks_are_named_with_both_shapes(model, batch):
    b = as_dtype(batch, jnp.int32)
    state = model.init_state(4)
    for wrong in (b["loss_mask"][:, :8], b["loss_mask"][:, None], b["loss_mask"][0]):
        with pytest.raises(
            ValueError,
            match=rf"batch\['loss_mask'\] has shape {tuple(wrong.shape)}".replace(
                "(", r"\("
            ).replace(")", r"\)")
            + r".*\(4, 16\)",
        ):
            tvq_eqx.loss_fn(model, dict(b, loss_mask=wrong), state)
        with pytest.raises(ValueError, match=r"mask must have the tokens' shape"):
            model(b["inputs"], state, mask=wrong)
    with pytest.raises(TypeError, match=r"batch\['loss_mask'\] must be an array"):
        tvq_eqx.loss_fn(model, dict(b, loss_mask=[[1.0] * 16] * 4), state)


# ---- state=None ---------------------------------------------------------------


def test_state_none_is_the_empty_history(model, batch):
    toks = jnp.asarray(batch["inputs"], jnp.int32)
    ref, ref_state = forward_jit(model, toks, model.init_state(4))
    got, got_state = forward_jit(model, toks, None)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    for a, b in zip(
        jax.tree.leaves(got_state), jax.tree.leaves(ref_state), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(TypeError, match="tokens must be an integer array"):
        model(jnp.zeros((4, 16)))
    # A numpy batch size (e.g. `inputs.shape[0]` of a numpy computation).
    assert model.init_state(np.int64(4)).unit(0).length.shape == (4,)
    # (The tests' runtime type checker may name it first: a TypeError.)
    with pytest.raises((ValueError, TypeError), match="batch_size"):
        model.init_state(np.bool_(True))


def test_empty_segment_returns_empty_logprobs_and_the_state(model, batch):
    """T = 0 through the model: `[B, 0, vocab]` log-probs, the state carried
    unchanged (a stream may hand over an empty chunk)."""
    toks = jnp.asarray(batch["inputs"], jnp.int32)
    _, state = forward_jit(model, toks, model.init_state(4))
    logprobs, after, _ = model(toks[:, :0], state)
    assert logprobs.shape == (4, 0, model.config.n_vocab)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- config ------------------------------------------------------------------


def test_config_accepts_numpy_ints_and_dtype_objects_canonically():
    with user_call():
        cfg = tvq_eqx.TransformerConfig(
            **{**TINY, "block_len": np.int64(8), "d_model": np.int32(16)},
            mem_len=np.uint8(4),
            dtype=jnp.bfloat16,
            param_dtype=np.dtype("float32"),
            c_gamma=np.float32(0.5),
        )
        others = {
            name: tvq_eqx.TransformerConfig(dtype=dtype).dtype
            for dtype, name in ((jnp.float16, "float16"), (np.float32, "float32"))
        }
    assert others == {"float16": "float16", "float32": "float32"}
    plain = tvq_eqx.TransformerConfig(
        **TINY, mem_len=4, dtype="bfloat16", param_dtype="float32", c_gamma=0.5
    )
    assert cfg == plain and hash(cfg) == hash(plain)
    assert type(cfg.block_len) is int and type(cfg.d_model) is int
    assert type(cfg.c_gamma) is float and cfg.dtype == "bfloat16"
    # Still serialises to JSON (run.json) and reads back equal.
    fields = json.loads(json.dumps(dataclasses.asdict(cfg)))
    fields.pop("pallas")
    assert tvq_eqx.TransformerConfig(**fields) == cfg


@pytest.mark.parametrize(
    "field,value,match",
    [
        (
            "implementation",
            "quadratic",
            r"implementation must be one of 'xla', 'pallas'",
        ),
        ("block_len", np.bool_(True), "block_len must be a positive int"),
        ("n_layer", True, "n_layer must be a positive int"),
        ("d_model", np.int64(0), "d_model must be a positive int"),
        ("n_code", np.float64(8.0), "n_code must be a positive int"),
        ("dtype", jnp.float64, r"dtype must be one of .*got 'float64'"),
        ("param_dtype", jnp.int8, r"param_dtype must be one of .*got 'int8'"),
        ("dtype", object(), r"dtype must be one of"),
    ],
)
def test_config_rejects_up_front(field, value, match):
    with user_call(), pytest.raises(ValueError, match=match):
        tvq_eqx.TransformerConfig(**{field: value})


# ---- composition: shard_map and batch-sharded jit -----------------------------


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 4, jax.devices()
    return jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))


def test_model_and_loss_run_inside_shard_map_as_unsharded(model, batch, mesh):
    # Default shard_map checks (check_vma=True): the token and target checks
    # used to fail with "cond branches must have equal output types".
    def local(model, batch):
        logprobs, _, _ = model(batch["inputs"])
        loss, aux = tvq_eqx.loss_fn(model, batch, model.init_state(1))
        lm_sum = jax.lax.psum(aux["metrics"]["lm_loss_sum"], "data")
        # Equal shards: the mean of the per-shard "positions" means is the
        # global one.
        return logprobs, jax.lax.pmean(loss, "data"), lm_sum

    @eqx.filter_jit
    def sharded(model, batch):
        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(), P("data")),
            out_specs=(P("data"), P(), P()),
        )(model, batch)

    b = as_dtype(batch, jnp.int32)
    got = sharded(model, b)
    ref_loss, ref_aux = loss_jit(model, b, model.init_state(4))
    ref_logprobs, _ = forward_jit(model, b["inputs"], model.init_state(4))
    ref = (ref_logprobs, ref_loss, ref_aux["metrics"]["lm_loss_sum"])
    # The sharded program may sum in another order: float32 log-probs of
    # magnitude ~10 then differ by a few ulp (1.9e-6 seen once, relative
    # 2.2e-7), so the bound is relative, 1e-5, with atol for values near 0.
    np.testing.assert_allclose(
        np.asarray(got[0]), np.asarray(ref[0]), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(float(got[1]), float(ref[1]), rtol=1e-5)
    np.testing.assert_allclose(float(got[2]), float(ref[2]), rtol=1e-5)
    # The checks still fire, from whichever device holds the bad id.
    with pytest.raises(Exception, match=r"token ids must be in"):
        sharded(model, dict(b, inputs=b["inputs"].at[3, 3].set(300)))


def test_batch_sharded_jit_compiles_without_rematerialization(
    model, batch, mesh, capfd, no_compilation_cache
):
    """XLA warns on stderr when it must gather a sharded array to one device
    ("Involuntary full rematerialization"): `eqx.error_if` on a batch-sharded
    array did that (its error branch is a host callback on one device)."""
    warning = "Involuntary full rematerialization"
    sharding = NamedSharding(mesh, P("data"))
    b = jax.device_put(as_dtype(batch, jnp.int32), sharding)

    # Positive control: the former check, on the sharded targets, does warn
    # (so the stderr capture sees XLA's log).
    def former(t):
        return eqx.error_if(t, t < 0, "bad") * 2

    capfd.readouterr()
    jax.jit(former, out_shardings=sharding).lower(b["targets"]).compile()
    assert warning in capfd.readouterr().err

    # The attention state split by batch rows as the train step does (its
    # arrays are stacked [n_layer, batch, ...]).
    rows = NamedSharding(mesh, P(None, "data"))
    state = jax.tree.map(
        lambda x: jax.device_put(x, rows if x.ndim else NamedSharding(mesh, P())),
        model.init_state(4),
    )
    # The loss forward holds every check (tokens, targets, mask); the
    # 4-device train step (tests/test_multidevice.py) compiles cleanly too.
    loss_jit.lower(model, b, state).compile()
    err = capfd.readouterr().err
    assert warning not in err, err[-2000:]
