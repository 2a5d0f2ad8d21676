"""Storage: our on-disk formats. ``pretrained`` (model weights + config, what ``sd3-convert``
writes and ``sd3_jax.load_pretrained`` reads), ``integrity`` (their per-array checksums),
``checkpoint`` (orbax train state + data iterator, exact resume), ``fileutil`` (atomic writes)."""
