"""Scaling-law studies of the MM-DiT: the depth family and its compute, sweeps, fits, analysis.

  python -m sd3_jax.scaling run configs/scaling/toy.py:DATA --sweep_dir DIR   # or --print_commands
  python -m sd3_jax.scaling analyze DIR --out OUT [--holdout largest]

The fits take plain numbers, from this repository's runs or any other:
``fit_power_law(compute, loss)``, ``fit_parametric(n, d, loss)``, ``fit_isoflop(budget, n, loss)``.
Importing this package is cheap; the submodules load on first use.
"""

__all__ = [
  "fit_power_law",
  "fit_parametric",
  "fit_isoflop",
  "PowerLawFit",
  "ParametricFit",
  "IsoFlopFit",
  "family_config",
  "param_counts",
  "run_compute",
  "sweep_config",
]

_HOMES = {
  "fit_power_law": "fits",
  "fit_parametric": "fits",
  "PowerLawFit": "fits",
  "ParametricFit": "fits",
  "fit_isoflop": "isoflop",
  "IsoFlopFit": "isoflop",
  "family_config": "family",
  "param_counts": "family",
  "run_compute": "family",
  "sweep_config": "sweep",
}


def __getattr__(name):
  if name in _HOMES:
    import importlib

    return getattr(importlib.import_module(f"sd3_jax.scaling.{_HOMES[name]}"), name)
  raise AttributeError(f"module 'sd3_jax.scaling' has no attribute {name!r}")
