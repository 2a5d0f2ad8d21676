"""Evaluation of text-to-image models in JAX: the paper's CLIP score and FID on CLIP features
(section 5.1), multi-host, plus an export for GenEval's own scorer.

Library:
  preprocess       CLIP image preprocessing on device, bit-exact with the PIL-based reference
  stats            float64 feature statistics merged across processes, Frechet distance, .npz
  clip_metrics     CLIPFeatures: image/text embeddings over a mesh, CLIP score
  scoring          evaluate(): sample prompts with our sampler, then CLIP score and CLIP-FID;
                   reference_statistics() of a real image folder; the trainer's periodic evaluator
  geneval          samples in the folder layout GenEval's scorer reads
Commands:
  evaluate         sd3-evaluate (also ``python -m sd3_jax.evaluation``)
  reference_stats  sd3-reference-stats
  geneval_export   sd3-geneval-export
"""
