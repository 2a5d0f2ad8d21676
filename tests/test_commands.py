"""Every command's expected failures: one line on stderr naming the problem, exit code 2, no
traceback (a traceback means a bug). The sample command's own cases are in test_sampling.py."""

import os
import subprocess
import sys

import pytest

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
    ("tools.convert_weights", ["--src", "{tmp}/no_ckpt", "--dst", "{tmp}/out", "--to", "jax"], "", "no_ckpt"),
  ],
)
def test_expected_failures_are_one_line(tmp_path, module, argv, prog, message):
  # tools/ is not installed: its commands run from the repository root, the library's from anywhere.
  r = _run(module, *[a.format(tmp=tmp_path) for a in argv], cwd=REPO if module.startswith("tools.") else tmp_path)
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(f"{prog}: error: " if prog else "error: ") and message in last, last


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
def test_help(module, flag):
  r = _run(module, "--help")
  # absl (sd3-train's flag parser) ends --help with exit code 1; argparse with 0.
  ok = (0, 1) if module == "sd3_jax.main" else (0,)
  assert r.returncode in ok and flag in r.stdout and "Traceback" not in r.stderr, r.stderr[-3000:]


def test_config_overrides_with_a_typo_name_the_key_and_a_suggestion(tmp_path):
  """Overrides given as a dict (the demo, sweeps) are checked as the command-line ones are."""
  from sd3_jax import config as config_lib

  with pytest.raises(ValueError, match=r"no such config key 'learning_rte'; did you mean \"learning_rate\"\?"):
    config_lib.load_config_file(os.path.join(REPO, "configs", "tiny.py"), overrides={"optimizer.learning_rte": 1e-3})
  with pytest.raises(ValueError, match=r"no such config key 'nope'"):
    config_lib.load_config_file(os.path.join(REPO, "configs", "tiny.py"), overrides={"nope": 1})
