"""Training: the loop and its parts (state and optimizer, the jitted step, the data side, start-up
checks, validation loss, divergence, preemption, prefetch, metrics and their writers).

``training.train.train_and_evaluate`` is the trainer; ``sd3-train`` (sd3_jax/main.py) calls it.
"""
