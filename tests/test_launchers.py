"""The launchers' exit-code policy (launch/restart_policy.sh) and the GKE JobSet manifest
(launch/gke_jobset.sh), run with bash; no cluster needed."""

import os
import shlex
import signal
import subprocess
import time

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _loop(tmp_path, codes, **env):
  """Runs sd3_run_with_restarts over a fake run that exits with ``codes`` one after another."""
  script = tmp_path / "fake_run.sh"
  script.write_text(
    "n=$(cat count 2>/dev/null || echo 0); echo $((n + 1)) > count\n"
    f"codes=({' '.join(map(str, codes))}); exit ${{codes[$n]}}\n"
  )
  cmd = f"source {REPO}/launch/restart_policy.sh; sd3_run_with_restarts bash {shlex.quote(str(script))}"
  p = subprocess.run(
    ["bash", "-c", f"set -euo pipefail; {cmd}"],
    cwd=tmp_path,
    env=dict(os.environ, SD3_RESTART_DELAY_S="0", **env),
    capture_output=True,
    text=True,
    timeout=60,
  )
  return p.returncode, int((tmp_path / "count").read_text()), p.stderr.strip().splitlines()


@pytest.mark.parametrize(
  "codes,want_code,want_runs",
  [
    ((42, 75, 134, 1, 137, 0), 0, 6),  # preempted, lost peer, SIGABRT, a bug, SIGKILL: restart
    ((75, 2), 2, 2),  # bad config/data/paths/storage: stop
    ((3,), 3, 1),  # divergence: stop
    ((42, 130), 130, 2),  # Ctrl-C: a user's stop
  ],
)
def test_restart_on_anything_but_done_bad_config_divergence_or_ctrl_c(tmp_path, codes, want_code, want_runs):
  code, runs, lines = _loop(tmp_path, codes)
  assert (code, runs) == (want_code, want_runs)
  assert len(lines) == want_runs - 1  # one line per restart, saying why
  if want_runs > 1:
    assert "exit 42 (preempted" in lines[0] or "exit 75 (a peer process was lost)" in lines[0]
    assert all("restarting in 0 s" in line for line in lines)


def test_restarts_are_bounded(tmp_path):
  code, runs, lines = _loop(tmp_path, (1,) * 10, SD3_MAX_RESTARTS="2")
  assert (code, runs) == (1, 3)
  assert "not restarting: already restarted 2 times" in lines[-1]


def test_sigterm_to_the_group_ends_the_loop_after_the_run_saved(tmp_path):
  """A scheduler's SIGTERM reaches the run (which saves and exits 42) and the loop: no restart."""
  script = tmp_path / "fake_run.sh"
  script.write_text("echo run >> runs; trap 'exit 42' TERM; touch started; while :; do sleep 0.05; done\n")
  cmd = f"source {REPO}/launch/restart_policy.sh; sd3_run_with_restarts bash {shlex.quote(str(script))}"
  p = subprocess.Popen(
    ["bash", "-c", cmd],
    cwd=tmp_path,
    env=dict(os.environ, SD3_RESTART_DELAY_S="0"),
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  deadline = time.time() + 30
  while not (tmp_path / "started").exists() and time.time() < deadline:
    time.sleep(0.05)
  os.killpg(p.pid, signal.SIGTERM)
  _, err = p.communicate(timeout=30)
  assert p.returncode == 42, err
  assert (tmp_path / "runs").read_text().count("run") == 1
  assert "stopped by a signal; the run ended with exit 42 (preempted" in err


def _manifest(*args):
  p = subprocess.run(
    ["bash", os.path.join(REPO, "launch/gke_jobset.sh"), *args], capture_output=True, text=True, timeout=60
  )
  return p.returncode, (yaml.safe_load(p.stdout) if p.returncode == 0 else p.stderr)


def _tpu_flags():
  p = subprocess.run(
    ["bash", "-c", f'source {REPO}/launch/tpu_flags.sh; echo "$TPU_XLA_FLAGS"'], capture_output=True, text=True
  )
  return p.stdout.strip()


def test_gke_jobset_for_two_v5p_256_slices():
  override = "--config.sample.prompts=('a cat', \"it's\")"
  code, m = _manifest(
    "configs/sd3_8b.py", "gs://bucket/run", "--image", "gcr.io/p/sd3:1", "--tpu", "v5p:4x4x8", "--slices", "2",
    "--max_restarts", "7", "--config.data.path=/data/records", override,
  )  # fmt: skip
  assert code == 0, m
  assert m["kind"] == "JobSet" and m["metadata"]["name"] == "sd3-sd3-8b"
  assert m["spec"]["failurePolicy"] == {
    "maxRestarts": 7,
    "rules": [{"action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}],
  }
  (job,) = m["spec"]["replicatedJobs"]
  spec = job["template"]["spec"]
  assert job["replicas"] == 2  # one Job per slice
  assert spec["parallelism"] == spec["completions"] == 32 and spec["backoffLimit"] == 0  # 128 chips / 4 per VM
  assert spec["podFailurePolicy"]["rules"] == [
    {"action": "FailJob", "onExitCodes": {"containerName": "train", "operator": "In", "values": [2, 3, 130]}}
  ]
  pod = spec["template"]["spec"]
  assert pod["nodeSelector"] == {
    "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
    "cloud.google.com/gke-tpu-topology": "4x4x8",
  }
  (c,) = pod["containers"]
  assert c["resources"]["limits"]["google.com/tpu"] == 4
  assert c["command"] == [
    "python", "-m", "sd3_jax.main", "--config", "configs/sd3_8b.py", "--workdir", "gs://bucket/run",
    "--multihost", "--config.data.path=/data/records", override,
  ]  # fmt: skip
  env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
  assert env["LIBTPU_INIT_ARGS"] == _tpu_flags() and "latency_hiding_scheduler=true" in env["LIBTPU_INIT_ARGS"]
  assert env["MEGASCALE_NUM_SLICES"] == "2"
  assert env["MEGASCALE_SLICE_ID"] == {
    "fieldRef": {"fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}
  }
  assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME)"
  # The single-slice launcher passes the same flags.
  assert "source launch/tpu_flags.sh" in open(os.path.join(REPO, "launch/tpu_pod.sh")).read()


@pytest.mark.parametrize("tpu,pods,chips", [("v6e:16x16", 64, 4), ("v5e:2x4", 1, 8), ("v4:2x2x1", 1, 4)])
def test_gke_jobset_pods_per_slice(tpu, pods, chips):
  code, m = _manifest("configs/tiny.py", "gs://b/r", "--image", "i", "--tpu", tpu, "--slices", "3")
  assert code == 0, m
  spec = m["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert spec["parallelism"] == pods
  assert spec["template"]["spec"]["containers"][0]["resources"]["limits"]["google.com/tpu"] == chips


@pytest.mark.parametrize(
  "args,match",
  [
    (("--tpu", "v5p-256", "--slices", "2"), "--tpu must look like v5p:4x4x8"),
    (("--tpu", "v9:2x2", "--slices", "2"), "unknown TPU generation 'v9'"),
    (("--tpu", "v5p:2x2x1", "--slices", "two"), "--slices must be a positive integer"),
  ],
)
def test_gke_jobset_bad_arguments_are_one_line(args, match):
  code, err = _manifest("configs/tiny.py", "gs://b/r", "--image", "i", *args)
  assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
