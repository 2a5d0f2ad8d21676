"""Inference: prompts to images. ``sampling`` (the ODE sampler with CFG), ``generation`` (prompts
-> encodings -> latents -> pixels, sample grids), ``loader`` (a generator from a run's workdir or
a converted checkpoint, shared by ``sd3-sample`` and ``sd3-evaluate``)."""
