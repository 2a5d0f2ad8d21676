"""The embedded demo: coloured-shape scenes with captions (``scenes``), small random text
encoders, the real trainer (``config``) and a programmatic checker of the samples (``run``).

``python -m sd3_jax.demo`` (or ``sd3-demo``) runs it end to end; see docs/demo.md.
"""
