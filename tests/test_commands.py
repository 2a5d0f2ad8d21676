"""Every command's expected failures: one line on stderr naming the problem, exit code 2, no
traceback (a traceback means a bug); every console script's --help and Ctrl-C. The sample
command's own cases are in test_sampling.py."""

import configparser
import json
import os
import re
import subprocess
import sys

import pytest

from sd3_jax import command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *argv, cwd=REPO):
  return subprocess.run(
    [sys.executable, "-m", module, *argv],
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )


@pytest.mark.parametrize(
  "module,argv,prog,message",
  [
    (
      "sd3_jax.main",
      [
        "--config",
        os.path.join(REPO, "configs", "tiny.py"),
        "--workdir",
        "{tmp}/run",
        "--config.data.source=records",
        "--config.data.path={tmp}/no_such_data",
      ],
      "sd3-train",
      "no_such_data",
    ),
    (
      "sd3_jax.main",
      ["--config", os.path.join(REPO, "configs", "tiny.py"), "--workdir", "{tmp}/run", "--config.data.source=lmdb"],
      "sd3-train",
      "config.data.source must be",
    ),
    (
      "sd3_jax.build_dataset",
      [
        "--images",
        "{tmp}/no_images",
        "--captions",
        "{tmp}/no_captions.jsonl",
        "--out",
        "{tmp}/out",
        "--identity_vae",
        "--text_encoders",
        "{tmp}/enc",
      ],
      "sd3-build-dataset",
      "no_images does not exist (--images)",
    ),
    (
      "sd3_jax.main",
      [
        "--config",
        os.path.join(REPO, "configs", "tiny.py"),
        "--workdir",
        "{tmp}/run",
        "--config.optimizer.learning_rte=1",
      ],
      "sd3-train",
      "--config.optimizer.learning_rte: no such config key 'learning_rte'; did you mean \"learning_rate\"?",
    ),
    (
      "tools.aot_compile",
      ["--config", os.path.join(REPO, "configs", "tiny.py"), "--config.modle.depth=2"],
      "python -m tools.aot_compile",
      "no such config key 'modle'; did you mean \"model\"?",
    ),
    ("sd3_jax.demo", ["--workdir", "{tmp}/demo", "--config", "{tmp}/no_config.py"], "sd3-demo", "no_config.py"),
    (
      "tools.convert_weights",
      ["--src", "{tmp}/no_ckpt", "--dst", "{tmp}/out", "--to", "jax"],
      "sd3-convert",
      "no_ckpt",
    ),
    ("sd3_jax.demo", ["--step", "10"], "sd3-demo", "unrecognized arguments: --step 10"),  # no abbreviations
    ("sd3_jax.sample", ["--workdir", "{tmp}"], "sd3-sample", "one of the arguments --prompt --prompts_file"),
  ],
)
def test_expected_failures_are_one_line(tmp_path, module, argv, prog, message):
  # tools/ is not installed: its commands run from the repository root, the library's from anywhere.
  r = _run(module, *[a.format(tmp=tmp_path) for a in argv], cwd=REPO if module.startswith("tools.") else tmp_path)
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(f"{prog}: error: ") and message in last, last
  assert "usage:" not in r.stderr, r.stderr  # one line, not argparse's usage block first


@pytest.mark.parametrize(
  "module,flag",
  [
    ("sd3_jax.main", "--workdir"),
    ("sd3_jax.sample", "--text_encoders"),
    ("sd3_jax.build_dataset", "--captions"),
    ("sd3_jax.demo", "--steps"),
    ("sd3_jax.convert", "--src"),
    ("tools.convert_weights", "--src"),
  ],
)
def test_help(module, flag, console_scripts):
  r = _run(module, "--help")
  assert r.returncode == 0 and flag in r.stdout and "Traceback" not in r.stderr, r.stderr[-3000:]
  if module == "sd3_jax.main":  # the same text as sd3-train's (absl's own help differed, and exited 1)
    assert r.stdout == console_scripts["sd3-train"]["help"]["out"]


def _console_scripts():
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(REPO, "setup.cfg"))
  lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
  return dict(tuple(x.strip() for x in line.split("=")) for line in lines)


# Runs every console script's entry point in one process, as its installed script does (argv[0]
# is the script's path): --help, and a Ctrl-C inside its work (the function the entry point calls
# raises KeyboardInterrupt; sd3-train's inside the training loop's caller).
PROBE = r"""
import contextlib, importlib, io, json, sys
scripts, workdir = json.loads(sys.argv[1]), sys.argv[2]
out = {}

def call(name, target, argv):
  module, func = target.split(":")
  sys.argv = [f"/venv/bin/{name}", *argv]
  o, e = io.StringIO(), io.StringIO()
  code = 0
  try:
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
      getattr(importlib.import_module(module), func)()
  except SystemExit as x:
    code = x.code or 0
  return {"code": code, "out": o.getvalue(), "err": e.getvalue()}

def ctrl_c(*a, **k):
  raise KeyboardInterrupt

for name, target in scripts.items():
  out[name] = {"help": call(name, target, ["--help"])}
for name, target in scripts.items():
  module = importlib.import_module(target.split(":")[0])
  if name == "sd3-train":
    from sd3_jax.training import train
    train.train_and_evaluate = ctrl_c
    argv = ["--config", "configs/tiny.py", "--workdir", workdir]
  else:
    module.main, argv = ctrl_c, []
  out[name]["ctrl_c"] = call(name, target, argv)
print("RESULTS" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def console_scripts(tmp_path_factory):
  scripts = _console_scripts()
  r = subprocess.run(
    [sys.executable, "-c", PROBE, json.dumps(scripts), str(tmp_path_factory.mktemp("run"))],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert r.returncode == 0 and "RESULTS" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
  return json.loads(r.stdout.split("RESULTS", 1)[1])


def test_every_console_script_has_help_and_a_one_line_ctrl_c(console_scripts):
  """--help exits 0 and names the command as it was called (not python -m ...); a Ctrl-C ends in
  one line that says what was kept, with exit code 130, and no traceback."""
  assert set(console_scripts) == set(_console_scripts()) and len(console_scripts) == 9
  for name, r in console_scripts.items():
    h = r["help"]
    assert h["code"] == 0 and h["err"] == "", (name, h)
    assert h["out"].startswith(f"usage: {name} ") or (name == "sd3-train" and "sd3-train --config" in h["out"]), h
    assert "--" in h["out"] and "python -m" not in h["out"].splitlines()[0], (name, h["out"][:300])
    c = r["ctrl_c"]
    lines = c["err"].strip().splitlines()
    assert c["code"] == command.EXIT_INTERRUPTED == 130, (name, c)
    assert len(lines) == 1 and lines[0].startswith(f"{name}: interrupted (Ctrl-C): "), (name, c)
    assert re.search(r"written|kept", lines[0]), lines[0]  # says what is (not) kept
  assert "--multihost" in console_scripts["sd3-train"]["help"]["out"]


def test_every_argparse_command_uses_the_shared_parser():
  """command.ArgumentParser: no abbreviations, one-line usage errors. A plain argparse parser in
  the library, the tools or the tests' commands would bring both back."""
  found = []
  for top in ("sd3_jax", "tools", "configs"):
    for root, _, files in os.walk(os.path.join(REPO, top)):
      for f in files:
        if f.endswith(".py"):
          text = open(os.path.join(root, f)).read()
          if "argparse.ArgumentParser(" in text and not f == "command.py":
            found.append(os.path.join(root, f))
  assert not found, found


def test_stops_on_request_are_one_line_with_their_code(capsys):
  from sd3_jax.training import preemption

  def stopped():
    raise preemption.Interrupted(7)

  with pytest.raises(SystemExit) as e:
    command.run(stopped, "sd3-demo")
  assert e.value.code == 130
  err = capsys.readouterr().err
  assert (
    err
    == "sd3-demo: stopped by Ctrl-C: saved and committed the checkpoint of step 7; rerun the same command to resume\n"
  )

  def preempted():
    raise preemption.Preempted(9)

  with pytest.raises(SystemExit) as e:
    command.run(preempted, "sd3-scaling")
  assert e.value.code == 42 and capsys.readouterr().err.startswith("sd3-scaling: preempted: saved and committed")


def test_config_overrides_with_a_typo_name_the_key_and_a_suggestion(tmp_path):
  """Overrides given as a dict (the demo, sweeps) are checked as the command-line ones are."""
  from sd3_jax import config as config_lib

  with pytest.raises(ValueError, match=r"no such config key 'learning_rte'; did you mean \"learning_rate\"\?"):
    config_lib.load_config_file(os.path.join(REPO, "configs", "tiny.py"), overrides={"optimizer.learning_rte": 1e-3})
  with pytest.raises(ValueError, match=r"no such config key 'nope'"):
    config_lib.load_config_file(os.path.join(REPO, "configs", "tiny.py"), overrides={"nope": 1})


def test_the_readme_lists_every_console_script_with_its_python_m_form():
  readme = open(os.path.join(REPO, "README.md")).read()
  rows = dict(re.findall(r"^\| `(sd3-[\w-]+)` \| `python -m ([\w.]+)` \|", readme, re.M))
  scripts = _console_scripts()
  assert set(rows) == set(scripts), set(rows) ^ set(scripts)
  for name, module in rows.items():  # the python -m form is the script's module or its package
    target = scripts[name].split(":")[0]
    assert target == module or target.rsplit(".", 1)[0] == module or target == f"{module}.main", (name, module)
