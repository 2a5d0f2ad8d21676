"""Evaluation of text-to-image models in JAX: the paper's CLIP score and FID on CLIP features
(section 5.1), multi-host, plus an export for GenEval's own scorer.

  preprocess     CLIP image preprocessing on device, bit-exact with the PIL-based reference
  stats          float64 feature statistics merged across processes, Frechet distance, .npz
  clip_metrics   CLIPFeatures: image/text embeddings over a mesh, CLIP score
  run            evaluate(): sample prompts with our sampler, then CLIP score and CLIP-FID;
                 reference_statistics() of a real image folder
  geneval        samples in the folder layout GenEval's scorer reads

Commands: ``sd3-evaluate`` (sd3_jax/evaluate.py), ``sd3-reference-stats``
(sd3_jax/reference_stats.py), ``sd3-geneval-export`` (sd3_jax/geneval_export.py).
"""
