"""Evaluation of text-to-image models in JAX: the paper's CLIP score and FID on CLIP features
(section 5.1), multi-host, plus an export for GenEval's own scorer.

  preprocess   CLIP image preprocessing on device, bit-exact with the PIL-based reference
"""
