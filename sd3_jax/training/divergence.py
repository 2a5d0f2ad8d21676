"""What the trainer's NaN stop says: whether the inputs or the training diverged.

Nothing is inspected while the loss is finite (the hot path is untouched). When a logged loss,
gradient norm or parameter norm turns NaN/Inf, the records of the recent batches are re-read from
the training source, in the order the input pipeline used (``input_pipeline.train_batch_indices``),
and checked: a record that is unreadable or holds NaN/Inf means the inputs are to blame, and its
id is named; if all are finite, the training itself diverged.
"""

from __future__ import annotations

from typing import Sequence

from sd3_jax.data import input_pipeline, records


def explain(
  source,
  steps: Sequence[int],
  *,
  global_batch_size: int,
  seed: int,
  process_index: int,
  process_count: int,
  shuffle: bool = True,
  max_named: int = 8,
) -> tuple[bool, str]:
  """(inputs_bad, sentence) for the batches of the 0-based ``steps`` (this process's rows)."""
  steps = list(steps)
  bad, checked = [], 0
  for step in steps:
    for i in input_pipeline.train_batch_indices(
      len(source),
      step,
      global_batch_size=global_batch_size,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
      shuffle=shuffle,
    ):
      checked += 1
      try:
        ex = source[int(i)]
      except ValueError as e:  # records.RecordError: unreadable, or NaN/Inf found on decoding
        bad.append(f"record {int(i)} (step {step + 1}): {' '.join(str(e).split())[:300]}")
        continue
      names = [k for k in records.TENSORS if not records.all_finite(getattr(ex, k))]
      if names:
        bad.append(f"record {int(i)} id {ex.metadata.get('id')!r} (step {step + 1}): NaN/Inf in {', '.join(names)}")
  span = f"step {steps[0] + 1}" if len(steps) == 1 else f"steps {steps[0] + 1}..{steps[-1] + 1}"
  if bad:
    shown = "; ".join(bad[:max_named]) + (f"; and {len(bad) - max_named} more" if len(bad) > max_named else "")
    return True, (
      f"the INPUTS diverged: {len(bad)} of the {checked} records of the batches of {span} "
      f"(this process's rows) are bad: {shown}"
    )
  return False, (
    f"the TRAINING diverged: the {checked} input records of the batches of {span} (this process's rows) are all finite"
  )


class TrainingDivergedError(RuntimeError):
  """The loss or gradient became NaN/Inf; the last good checkpoint is left in place."""
