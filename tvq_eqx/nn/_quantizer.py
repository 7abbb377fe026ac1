"""Vector quantizer with an exponential-moving-average codebook."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ..ops import quantize
from ..ops._common import HIGHEST, gather_codes

sg = jax.lax.stop_gradient


class VectorQuantizer(eqx.Module):
    """Per-head codebook learned by EMA of per-code key sums and counts.

    The codebook is `codebook_sum / codebook_count`. Neither array receives a
    gradient from the model; their only gradient is `codebook_loss`, a
    surrogate whose SGD step with learning rate 1 is exactly the EMA update
    `theta <- c_gamma theta + (1 - c_gamma) batch_statistic` (as in the official
    code). `ema_update` applies the same update directly.

    The codebook lives in the unscaled key space of `VQAttention` (keys after
    the q/k norm); the official `LearnableVQ` works in the pre-scaled space
    `k * d_k^-1/4`. Official parameters map as `codebook_sum = c_sum *
    d_k^(1/4)`, `codebook_count = c_count`.

    `ema_tally` is 1 + the number of EMA steps applied. Its surrogate
    gradient is -1, so the EMA rule (SGD with learning rate 1 on the
    codebook) adds exactly 1 per step and it stays a whole number. Any other
    optimizer step on the codebook (Adam's normalisation, weight decay, a
    clip, another learning rate) leaves a fraction, and the model's forward
    pass then raises: a plain `optax.adamw` over the whole model is loud at
    the next call instead of silently training a wrong codebook. It starts
    at 1, not 0, so that weight decay alone moves it too.
    """

    codebook_sum: Float[Array, "heads codes d_k"]
    codebook_count: Float[Array, "heads codes"]
    ema_tally: Float[Array, ""]
    c_gamma: float = eqx.field(static=True)

    def __init__(
        self, n_head: int, n_code: int, d_k: int, *, c_gamma: float, key: PRNGKeyArray
    ):
        # Official init (`c_sum` by variance scaling, fan_in = heads * codes,
        # normal; `c_count` ones) in the official pre-scaled key space
        # `k * d_k^-1/4`; our codebook lives in the unscaled key space, so the
        # sums carry a factor d_k^(1/4).
        std = d_k**0.25 * (n_head * n_code) ** -0.5
        self.codebook_sum = std * jax.random.normal(
            key, (n_head, n_code, d_k), jnp.float32
        )
        self.codebook_count = jnp.ones((n_head, n_code), jnp.float32)
        self.ema_tally = jnp.ones((), jnp.float32)
        self.c_gamma = c_gamma

    @property
    def codebook(self) -> Float[Array, "heads codes d_k"]:
        """The codewords (float32, no gradient)."""
        count = jnp.maximum(self.codebook_count, 1e-2)[..., None]
        return sg(self.codebook_sum / count)

    def statistics(
        self,
        key: Float[Array, "batch seq heads d_k"],
        mask: Float[Array, "batch seq"],
    ) -> dict[str, Array]:
        """Commit loss and codebook statistics over non-masked tokens.

        Sums (not means) so that they add up across batches and devices:

        - `commit_sum` (differentiable w.r.t. `key`): the official commit
          loss's numerator, `sum_{b,t} mask * sum_h ||k' - c'||^2` with
          `k' = k d_k^-1/4`, `c' = C[z] d_k^-1/4` in the official quantizer's
          pre-scaled space (so it is `d_k^-1/2` times the squared distance in
          our unscaled key space);
        - `code_count [heads, codes]`, `code_key_sum [heads, codes, d_k]`,
          `sq_err`, `sq_norm` (unscaled key space, no gradient).
        """
        codebook = self.codebook
        codes = quantize(key, codebook)
        codeword = gather_codes(codebook, codes)  # [B, T, H, K] float32
        k32 = key.astype(jnp.float32)
        m = mask.astype(jnp.float32)
        sq_dist = jnp.sum(jnp.sum(jnp.square(k32 - codeword), axis=-1), axis=-1)
        onehot = jax.nn.one_hot(codes, codebook.shape[1], dtype=jnp.float32)
        onehot = onehot * m[:, :, None, None]
        d_k = key.shape[-1]
        return dict(
            commit_sum=jnp.sum(sq_dist * m) * d_k**-0.5,
            code_count=sg(jnp.sum(onehot, axis=(0, 1))),
            code_key_sum=sg(
                jnp.einsum("bths,bthk->hsk", onehot, k32, precision=HIGHEST)
            ),
            sq_err=sg(jnp.sum(sq_dist * m)),
            sq_norm=sg(jnp.sum(jnp.sum(jnp.square(k32), axis=(-1, -2)) * m)),
        )

    def codebook_loss(self, code_count: Array, code_key_sum: Array) -> Float[Array, ""]:
        """Surrogate whose gradient step (lr 1) is the EMA update of the codebook."""
        w = 0.5 * (1.0 - self.c_gamma)
        return w * (
            jnp.sum(jnp.square(self.codebook_sum - sg(code_key_sum)))
            + jnp.sum(jnp.square(self.codebook_count - sg(code_count)))
        )

    def tally_loss(self) -> Float[Array, ""]:
        """Surrogate whose gradient step (lr 1) adds 1 to `ema_tally`."""
        return -jnp.sum(self.ema_tally)

    def tally_is_whole(self) -> Bool[Array, "*layers"]:
        """Whether `ema_tally` is a whole number (per stacked layer): false
        once an optimizer other than the EMA rule has moved the codebook."""
        return self.ema_tally == jnp.round(self.ema_tally)

    def ema_update(self, code_count: Array, code_key_sum: Array) -> VectorQuantizer:
        """The EMA step applied directly (equals one SGD(1) step on codebook_loss)."""
        g = self.c_gamma
        new_sum = g * self.codebook_sum + (1.0 - g) * code_key_sum
        new_count = g * self.codebook_count + (1.0 - g) * code_count
        return eqx.tree_at(
            lambda q: (q.codebook_sum, q.codebook_count, q.ema_tally),
            self,
            (new_sum, new_count, self.ema_tally + 1.0),
        )
