"""Hand-written Pallas kernels for tvq-eqx (GPU via Triton, TPU via Mosaic,
interpret mode on CPU). Imports nothing from `tvq_eqx`: every op takes plain
arrays in the kernel layout documented in its folder's README."""
