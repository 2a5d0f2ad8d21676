"""Parameter trees under flat names: "a/b/c" <-> nested dicts (how our checkpoints and the
converters' key tables name tensors), and the shape check that names every missing, unexpected
and wrongly shaped tensor."""

from __future__ import annotations

from typing import Any, Mapping


def flatten(tree: Mapping) -> dict[str, Any]:
  out: dict[str, Any] = {}

  def rec(prefix, node):
    if isinstance(node, Mapping):
      for k, v in node.items():
        rec(f"{prefix}{k}/", v)
    else:
      out[prefix[:-1]] = node

  rec("", tree)
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  tree: dict = {}
  for name, v in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def check_shapes(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
  """Raises ValueError naming every missing, unexpected and wrongly shaped tensor."""
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  wrong = [
    f"{k}: found {list(found[k])}, expected {list(expected[k])}"
    for k in expected
    if k in found and tuple(found[k]) != tuple(expected[k])
  ]
  if not (missing or unexpected or wrong):
    return
  lines = [f"{what} does not match the model configuration:"]
  for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
    if items:
      shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
      lines.append(f"  {title} ({len(items)}): " + "; ".join(shown))
  raise ValueError("\n".join(lines))
