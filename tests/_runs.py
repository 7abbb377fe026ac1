"""The tiny training run shared by the fit, checkpoint and safety tests
(a 1-layer byte model on 2 x 16 tokens); each test file changes what it
needs with `TINY_RUN.replace(...)`."""

from __future__ import annotations

import tvq_eqx
from tvq_eqx import train

TINY_RUN = train.RunConfig(
    model=tvq_eqx.TransformerConfig(
        n_vocab=256, d_model=16, d_k=8, d_v=16, n_code=4, n_layer=1, block_len=8
    ),
    data=train.DataConfig(batch_size=2, seq_len=16),
    optimizer=train.OptimizerConfig(learning_rate=1e-2, warmup_steps=1),
    update_len=8, steps=4, context_len=32, eval_every=0, eval_batches=2,
    log_every=2, save_every=2, keep=5, sample_len=0,
)  # fmt: skip
