"""Everything between data and model: the formulations of the paper's study (section 2,
appendix B) and the pieces they are made of. Plain ``jnp`` with explicit RNG keys, usable
inside ``jit``.

  flow.get_formulation(name)  a Formulation from its name in the paper's Table 1 notation
  flow.FORMULATIONS           the names of the paper's formulations we build
  flow.formulations           Formulation: alpha, sigma, noised, target, x0_from, sample_t, loss
  flow.paths                  the noising paths (rf, cosine, LDM-linear, EDM) and their log-SNR
  flow.rectified              rectified flow's noising, velocity, loss and timestep densities
  flow.solver                 the deterministic sampler's schedule and step for every formulation
  flow.levels                 the validation loss at fixed levels, and the rf yardstick
  flow.conditioning           text-encoder layout, assembly and conditioning dropout

Names (spaces ignored; numbers are written back with two decimals):

  rf                      rectified flow, t uniform
  rf/lognorm(m,s)         t = sigmoid(u), u ~ N(m, s^2)              (default: rf/lognorm(0.00,1.00))
  rf/mode(s)              t = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1), -1 <= s <= 2/(pi-2)
  rf/cosmap               t = 1 - 1 / (tan(pi u / 2) + 1)
  eps/linear, v/linear    LDM's discrete VP schedule (T = 1000, scaled-linear betas 0.00085..0.012)
  eps/cos, v/cos          a = cos(pi t / 2), b = sin(pi t / 2), t uniform
  edm(P_mean,P_std)       EDM: log sigma ~ N(P_mean, P_std^2), F-prediction (Karras: edm(-1.20,1.20))
  edm/cos, edm/rf         EDM's F-prediction at the log-SNR density and weighting of v/cos or rf;
                          edm/<name> for any rf or cos formulation (edm/rf/lognorm(0.00,1.00), ...)
"""

from __future__ import annotations

import dataclasses
import math
import re

from sd3_jax.flow import conditioning, formulations, levels, paths, rectified, solver  # noqa: F401
from sd3_jax.flow.formulations import (
  ClippedDensity,
  DiscreteUniformDensity,
  Formulation,
  RectifiedDensity,
  UniformDensity,
)

DEFAULT = "rf/lognorm(0.00,1.00)"
# The formulations of the paper's Table 1 (and its text) in its notation.
FORMULATIONS = (
  "rf/lognorm(0.00,1.00)",
  "rf/lognorm(1.00,0.60)",
  "rf/lognorm(0.50,0.60)",
  "rf/lognorm(0.50,1.00)",
  "rf/lognorm(-0.50,1.00)",
  "rf/mode(1.29)",
  "rf/mode(1.75)",
  "rf/mode(-0.50)",
  "rf/cosmap",
  "rf",
  "eps/linear",
  "v/linear",
  "eps/cos",
  "v/cos",
  "edm(-1.20,1.20)",
  "edm(0.00,0.60)",
  "edm(0.60,1.20)",
  "edm/cos",
  "edm/rf",
)
FORMS = (
  "rf, rf/lognorm(m,s), rf/mode(s), rf/cosmap, eps/linear, v/linear, eps/cos, v/cos, "
  "edm(P_mean,P_std), edm/cos, edm/rf, edm/<an rf or cos name>"
)
EPS_COS_T_START = 0.999  # eps-prediction cannot give x0 at t = 1 of the cosine path (a = 0)

_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
_PATTERNS = {
  "lognorm": re.compile(rf"rf/lognorm\({_NUM},{_NUM}\)"),
  "mode": re.compile(rf"rf/mode\({_NUM}\)"),
  "edm": re.compile(rf"edm\({_NUM},{_NUM}\)"),
}


def _num(x: float) -> str:
  return f"{x:.2f}" if abs(x - round(x, 2)) < 1e-12 else f"{x:g}"


def _bad(name: str, why: str = "") -> ValueError:
  return ValueError(f"unknown formulation {name!r}{': ' + why if why else ''}; valid forms: {FORMS}")


def get_formulation(name: str, *, shift: float = 1.0) -> Formulation:
  """The formulation called ``name`` (module docstring). ``shift`` is rectified flow's
  resolution shift of the training density (``rectified.shift_t``); other formulations refuse
  any shift but 1. Raises ValueError listing the valid forms for an unknown or malformed name."""
  if not isinstance(name, str):
    raise _bad(repr(name), "a formulation is named by a string")
  key = "".join(name.split()).lower()
  f = _build(key, name)
  if shift != 1.0:
    if not f.is_rectified:
      raise ValueError(
        f"a shift of {shift} applies to rectified-flow formulations (rf, rf/...); {f.name} trains "
        "with its own density: use shift 1.0 (config.flow.shift)"
      )
    if not shift > 0:
      raise ValueError(f"shift must be > 0, got {shift}")
    f = dataclasses.replace(f, density=dataclasses.replace(f.density, shift=shift))
  return f


def canonical_name(name: str) -> str:
  """``name`` written the canonical way (two decimals, no spaces); raises for unknown names."""
  return get_formulation(name).name


def _rectified(key: str, name: str) -> Formulation:
  if key == "rf":
    return _rf("rf", RectifiedDensity("uniform"))
  if key == "rf/cosmap":
    return _rf("rf/cosmap", RectifiedDensity("cosmap"))
  m = _PATTERNS["lognorm"].fullmatch(key)
  if m:
    mean, std = float(m.group(1)), float(m.group(2))
    if not std > 0 or not math.isfinite(mean + std):
      raise _bad(name, f"lognorm(m,s) needs a finite m and s > 0, got s={std}")
    return _rf(f"rf/lognorm({_num(mean)},{_num(std)})", RectifiedDensity("logit_normal", m=mean, s=std))
  m = _PATTERNS["mode"].fullmatch(key)
  if m:
    s = float(m.group(1))
    if not -1.0 <= s <= 2.0 / (math.pi - 2.0):
      raise _bad(name, f"mode(s) needs -1 <= s <= 2/(pi-2) = {2 / (math.pi - 2):.4f}, got {s}")
    return _rf(f"rf/mode({_num(s)})", RectifiedDensity("mode", mode_scale=s))
  raise _bad(name)


def _rf(name: str, density: RectifiedDensity) -> Formulation:
  return Formulation(name, paths.RectifiedPath(), "velocity", density, schedule="rf")


def _build(key: str, name: str) -> Formulation:
  if key == "rf" or key.startswith("rf/"):
    return _rectified(key, name)
  if key in ("eps/linear", "v/linear"):
    return Formulation(
      key, paths.LinearVPPath(), key.split("/")[0], DiscreteUniformDensity(paths.LinearVPPath().num_steps)
    )
  if key in ("eps/cos", "v/cos"):
    pred = key.split("/")[0]
    return Formulation(
      key, paths.CosinePath(), pred, UniformDensity(), t_start=EPS_COS_T_START if pred == "eps" else 1.0
    )
  m = _PATTERNS["edm"].fullmatch(key)
  if m:
    p_mean, p_std = float(m.group(1)), float(m.group(2))
    if not p_std > 0 or not math.isfinite(p_mean + p_std):
      raise _bad(name, f"edm(P_mean,P_std) needs a finite P_mean and P_std > 0, got P_std={p_std}")
    path = paths.VEPath(paths.LogNormalSigma(p_mean, p_std))
    return Formulation(
      f"edm({_num(p_mean)},{_num(p_std)})", path, "F", UniformDensity(formulations.EDGE), schedule="karras"
    )
  if key.startswith("edm/"):
    rest = key[len("edm/") :]
    ref_key = "v/cos" if rest == "cos" else rest
    if not (ref_key == "rf" or ref_key.startswith("rf/") or ref_key in ("eps/cos", "v/cos")):
      raise _bad(name, "edm/<name> takes the weighting of an rf or cos formulation")
    ref = _build(ref_key, name)
    canonical = "edm/cos" if ref.name == "v/cos" else f"edm/{ref.name}"
    path = paths.VEPath(paths.RatioSigma(ref.path))
    return Formulation(canonical, path, "F", ClippedDensity(ref.density), weighting_of=ref, schedule="karras")
  raise _bad(name)
