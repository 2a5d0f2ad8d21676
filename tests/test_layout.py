"""The layout's rules: imports point one way, files stay one concept, and the package works
installed (not only from this checkout).

- No import cycles among the modules of ``sd3_jax/`` and ``tools/`` (every import statement
  counts, also one inside a function).
- No module of ``sd3_jax/`` imports ``tools``, ``configs`` or ``launch``.
- No Python file over 500 lines.
- Commands stay commands: no module of the library imports a command module (a console script
  of setup.cfg), and no command imports another; a ``__main__`` module only runs its command.
- Wings point down: models/flow/config/command, then sharding, then the stores (storage, data,
  convert), then text conditioning and inference, then training and evaluation, then the demo and
  scaling libraries, then the commands. A module never imports from a higher wing.
- The top of ``sd3_jax/`` holds at most 12 modules (the shared core and thin commands).
- ``pip install .`` (not editable) into a fresh virtual environment: from another directory,
  ``import sd3_jax``, a conditioner loaded from transformers directories, and the ``sd3-convert``
  entry point all work, and ``tools`` is not installed.
"""

import ast
import configparser
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("sd3_jax", "tools")
OFF_LIMITS = ("tools", "configs", "launch")  # what the library never imports


def _modules(package: str) -> dict[str, str]:
  """Dotted module name -> file, for every .py file under ``package``."""
  out = {}
  for root, _, files in os.walk(os.path.join(REPO, package)):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].split(os.sep)
        if rel[-1] == "__init__":
          rel = rel[:-1]
        out[".".join(rel)] = os.path.join(root, f)
  return out


def _imported_names(path: str, module: str) -> set[str]:
  """Every absolute module name an import statement anywhere in the file imports. For
  ``from p import x`` that is ``p.x`` when x is a module, else ``p`` (``import_graph`` decides
  which by what exists), so both are listed as ``p:x``."""
  is_package = path.endswith("__init__.py")
  names = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolve against this module's package
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        prefix = ".".join(base + ([node.module] if node.module else []))
      else:
        prefix = node.module
      names.update(f"{prefix}:{a.name}" for a in node.names)
  return names


def _resolve(name: str, modules) -> str | None:
  """The module of ours an imported name refers to (the closest one above it), or None."""
  if ":" in name:
    prefix, attr = name.split(":")
    if f"{prefix}.{attr}" in modules:
      return f"{prefix}.{attr}"
    name = prefix
  parts = name.split(".")
  while parts and ".".join(parts) not in modules:
    parts.pop()
  return ".".join(parts) or None


def import_graph() -> dict[str, set[str]]:
  modules = {}
  for p in PACKAGES:
    modules.update(_modules(p))
  graph = {}
  for mod, path in modules.items():
    deps = {_resolve(n, modules) for n in _imported_names(path, mod)}
    graph[mod] = {d for d in deps if d and d != mod}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1 on the stack, 2 done
  stack: list[str] = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for d in sorted(graph.get(m, ())):
      if state.get(d) == 1:
        return stack[stack.index(d) :] + [d]
      if d not in state:
        found = visit(d)
        if found:
          return found
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_library_never_imports_tools_configs_or_launch():
  bad = []
  for mod, path in _modules("sd3_jax").items():
    for name in _imported_names(path, mod):
      if name.split(":")[0].split(".")[0] in OFF_LIMITS:
        bad.append(f"{os.path.relpath(path, REPO)} imports {name}")
  assert not bad, "\n".join(bad)


def test_import_walker_resolves_modules(tmp_path):
  # `from . import x` inside package p names p.x; `from p import x` names p and p.x.
  f = tmp_path / "m.py"
  f.write_text("from . import x\nfrom .y import z\nimport a.b\ndef g():\n  from c import d\n")
  assert _imported_names(str(f), "p.m") == {"p:x", "p.y:z", "a.b", "c:d"}
  assert _resolve("p:x", {"p", "p.x"}) == "p.x" and _resolve("p:f", {"p", "p.x"}) == "p"
  graph = import_graph()
  assert "sd3_jax.convert.formats" in graph["sd3_jax.convert"]
  assert "sd3_jax.models.mmdit" in graph["sd3_jax.models.flops"]


def test_no_file_over_500_lines():
  long = []
  for top in ("sd3_jax", "tools", "configs", "tests"):
    for root, _, files in os.walk(os.path.join(REPO, top)):
      for f in files:
        if f.endswith(".py"):
          n = sum(1 for _ in open(os.path.join(root, f)))
          if n > 500:
            long.append(f"{os.path.relpath(os.path.join(root, f), REPO)}: {n} lines")
  assert not long, "split these (one concept per file):\n" + "\n".join(long)


def command_modules() -> set[str]:
  """The modules behind setup.cfg's console scripts."""
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(REPO, "setup.cfg"))
  out = set()
  for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines():
    out.add(line.split("=", 1)[1].strip().split(":")[0])
  return out


def test_command_modules_are_found():
  cmds = command_modules()
  assert {"sd3_jax.main", "sd3_jax.sample", "sd3_jax.convert.cli", "sd3_jax.evaluation.evaluate"} <= cmds
  graph = import_graph()
  assert all(c in graph for c in cmds), sorted(cmds - set(graph))


def test_no_command_is_imported_by_the_library_or_another_command():
  cmds = command_modules()
  bad = []
  for mod, deps in import_graph().items():
    if mod.endswith("__main__"):
      continue  # `python -m pkg` runs its command
    for d in sorted(deps & cmds):
      kind = "command" if mod in cmds else ("tool" if mod.startswith("tools") else "library module")
      bad.append(f"{kind} {mod} imports the command {d}: move what it needs into the library")
  assert not bad, "\n".join(bad)


# Wing of each top-level name under sd3_jax, bottom (0) to top; commands are above everything.
WINGS = {
  "models": 0,
  "flow": 0,
  "config": 0,
  "command": 0,
  "sharding": 1,
  "storage": 2,
  "data": 2,
  "convert": 2,
  "text_conditioning": 3,
  "inference": 3,
  "training": 4,
  "evaluation": 4,
  "demo": 5,
  "scaling": 5,
}
COMMAND_WING = 6


def wing(module: str, cmds: set[str]) -> int | None:
  if module in cmds or module.endswith("__main__"):
    return COMMAND_WING
  parts = module.split(".")
  if parts[0] != "sd3_jax" or len(parts) < 2:
    return None  # tools, and sd3_jax's own __init__ (the public entry points)
  return WINGS.get(parts[1])


def test_wings_point_down():
  cmds = command_modules()
  tops = {
    f[:-3] if f.endswith(".py") else f
    for f in os.listdir(os.path.join(REPO, "sd3_jax"))
    if (f.endswith(".py") and f != "__init__.py") or os.path.isfile(os.path.join(REPO, "sd3_jax", f, "__init__.py"))
  }
  unplaced = sorted(t for t in tops if t not in WINGS and f"sd3_jax.{t}" not in cmds)
  assert not unplaced, f"give these a wing in WINGS (or make them commands): {unplaced}"
  bad = []
  for mod, deps in import_graph().items():
    w = wing(mod, cmds)
    if w is None:
      continue
    for d in sorted(deps):
      wd = wing(d, cmds)
      if wd is not None and wd > w:
        bad.append(f"{mod} (wing {w}) imports {d} (wing {wd})")
  assert not bad, "imports must point down:\n" + "\n".join(bad)


def test_the_top_of_the_package_is_small():
  top = sorted(f for f in os.listdir(os.path.join(REPO, "sd3_jax")) if f.endswith(".py"))
  assert len(top) <= 12, f"{len(top)} modules directly in sd3_jax/ (at most 12): {top}"


# --------------------------------------------------------------------------------------------
# Installed, not editable


def _site_packages(python: str) -> str:
  return subprocess.check_output(
    [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
  ).strip()


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """A fresh venv with sd3_jax installed from a wheel of this checkout; its dependencies come
  from the test environment (a .pth line), so nothing is downloaded."""
  root = tmp_path_factory.mktemp("fresh")
  env_dir = root / "venv"
  subprocess.check_call([sys.executable, "-m", "venv", "--without-pip", str(env_dir)])
  python = str(env_dir / "bin" / "python")
  with open(os.path.join(_site_packages(python), "deps.pth"), "w") as f:
    f.write(_site_packages(sys.executable) + "\n")
  out = subprocess.run(
    [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", REPO],
    capture_output=True,
    text=True,
    cwd=root,
  )
  assert out.returncode == 0, out.stdout + out.stderr
  return root, env_dir


def _run(root, env_dir, code: str) -> str:
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run(
    [str(env_dir / "bin" / "python"), "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=root, env=env
  )
  assert out.returncode == 0, out.stdout + out.stderr
  return out.stdout


def test_installed_package_works_from_another_directory(installed):
  root, env_dir = installed
  # The package comes from the venv, not from this checkout; `tools` is not installed.
  _run(
    root,
    env_dir,
    f"""
      import importlib.util, sd3_jax
      assert sd3_jax.__file__.startswith({str(env_dir)!r}), sd3_jax.__file__
      assert importlib.util.find_spec("tools") is None
      from sd3_jax.demo import config
      assert config.get_config().model.in_channels == 3
      # an experiment config of the repository, by path, from elsewhere, sys.path untouched
      import sys
      from sd3_jax.config import load_config_file
      before = list(sys.path)
      c = load_config_file({os.path.join(REPO, "configs", "tiny.py")!r}, overrides={{"total_steps": 7}})
      assert c.total_steps == 7 and c.model.hidden_size == 64 and sys.path == before
      assert "configs" not in sys.modules
      """,
  )
  # Small random encoders (our checkpoints) -> transformers directories with the installed
  # sd3-convert, then a conditioner from those directories equals one from ours.
  _run(
    root,
    env_dir,
    """
      import os, shutil, subprocess, sys
      import numpy as np
      from sd3_jax.demo import encoders as demo_encoders
      from sd3_jax import text_conditioning as tc
      caps = ["a red circle above a blue square", "a green square"]
      demo_encoders.make_text_encoders("ours", caps, clip_l_dim=16, clip_g_dim=16, t5_dim=32, seed=0)
      os.makedirs("hf")
      conv = os.path.join(os.path.dirname(sys.executable), "sd3-convert")
      for name in os.listdir("ours"):
        if name.startswith("tokenizer"):
          shutil.copytree(os.path.join("ours", name), os.path.join("hf", name))
        else:
          subprocess.check_call([conv, "--src", os.path.join("ours", name), "--dst", os.path.join("hf", name),
                                 "--to", "transformers"], stdout=subprocess.DEVNULL)
      assert os.path.isfile("hf/text_encoder/config.json") and os.path.isfile("hf/text_encoder/model.safetensors")
      a = tc.load_conditioner("ours", clip_length=12, t5_length=12).encode(caps)
      b = tc.load_conditioner("hf", clip_length=12, t5_length=12).encode(caps)
      for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
      print("ok")
      """,
  )
