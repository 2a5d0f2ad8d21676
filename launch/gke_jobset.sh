#!/usr/bin/env bash
# A multi-slice TPU run of any config on GKE, as a JobSet (one replicated Job per slice, one
# pod per TPU VM). Prints the manifest; --apply sends it to the cluster with kubectl.
#
#   bash launch/gke_jobset.sh CONFIG WORKDIR --image IMAGE --tpu v5p:4x4x8 --slices 2 \
#       [--name NAME] [--max_restarts 20] [--repo_dir /sd3_jax] [--apply] [--config.key=value ...]
#
# --tpu uses the names of tools.aot_compile --topology (check the fit first with
#   python -m tools.aot_compile --config CONFIG --topology v5p:4x4x8 --num_slices 2).
# IMAGE holds this repository at --repo_dir with its dependencies (pip install -e '.[tpu]');
# WORKDIR is shared by all hosts (gs://BUCKET/run, the gcs extra). Every pod runs sd3-train with
# --multihost: jax.distributed finds the slices from the MEGASCALE_* variables set below and
# the TPU_WORKER_* ones GKE sets. The exit-code policy (docs/multislice.md) is the JobSet's:
# exit 2 (bad config, data, paths or storage) or 3 (divergence) in any pod fails the whole
# JobSet at once (podFailurePolicy FailJob + failurePolicy FailJobSet); any other failure
# (42 preempted, 75 a peer was lost, a lost VM, SIGABRT, ...) restarts every slice, at most
# --max_restarts times; each restart resumes from the newest intact checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: bash launch/gke_jobset.sh CONFIG WORKDIR --image IMAGE --tpu v5p:4x4x8 --slices N [--name NAME] [--max_restarts N] [--repo_dir DIR] [--apply] [--config.key=value ...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
config="$1"; workdir="$2"; shift 2
image="" tpu="" slices="" name="" max_restarts=20 repo_dir=/sd3_jax apply="" overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --image) image="$2"; shift 2 ;;
    --tpu) tpu="$2"; shift 2 ;;
    --slices) slices="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --max_restarts) max_restarts="$2"; shift 2 ;;
    --repo_dir) repo_dir="$2"; shift 2 ;;
    --apply) apply=1; shift ;;
    --config.*) overrides+=("$1"); shift ;;
    *) echo "launch/gke_jobset.sh: error: unknown argument $1" >&2; usage ;;
  esac
done
[ -n "$image" ] && [ -n "$tpu" ] && [ -n "$slices" ] || usage
[[ "$slices" =~ ^[1-9][0-9]*$ ]] || { echo "launch/gke_jobset.sh: error: --slices must be a positive integer, got '$slices'" >&2; exit 2; }
[[ "$max_restarts" =~ ^[0-9]+$ ]] || { echo "launch/gke_jobset.sh: error: --max_restarts must be a non-negative integer, got '$max_restarts'" >&2; exit 2; }

# --tpu GENERATION:TOPOLOGY -> the node pool labels and TPU VMs (pods) per slice.
generation="${tpu%%:*}"; topology="${tpu#*:}"
[[ "$tpu" == *:* && "$topology" =~ ^[0-9]+(x[0-9]+)+$ ]] || {
  echo "launch/gke_jobset.sh: error: --tpu must look like v5p:4x4x8 or v6e:16x16, got '$tpu'" >&2; exit 2; }
chips=$(( ${topology//x/*} ))
case "$generation" in
  v4) accelerator=tpu-v4-podslice; per_vm=4 ;;
  v5p) accelerator=tpu-v5p-slice; per_vm=4 ;;
  v5e) accelerator=tpu-v5-lite-podslice; per_vm=$(( chips <= 8 ? chips : 4 )) ;;
  v6e) accelerator=tpu-v6e-slice; per_vm=$(( chips <= 8 ? chips : 4 )) ;;
  *) echo "launch/gke_jobset.sh: error: unknown TPU generation '$generation' (v4, v5p, v5e, v6e)" >&2; exit 2 ;;
esac
per_vm=$(( chips < per_vm ? chips : per_vm ))
vms=$(( chips / per_vm ))
base="$(basename "$config" .py)"
name="${name:-sd3-${base//_/-}}"
[[ "$name" =~ ^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$ ]] || {
  echo "launch/gke_jobset.sh: error: --name '$name' must be a lower-case DNS label of at most 40 characters" >&2; exit 2; }

source launch/tpu_flags.sh
args=(python -m sd3_jax.main --config "$config" --workdir "$workdir" --multihost "${overrides[@]}")
command_yaml=""
for a in "${args[@]}"; do
  command_yaml+="              - '${a//\'/\'\'}'"$'\n'
done

manifest=$(cat <<YAML
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: ${name}
  annotations:
    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool  # one slice per node pool
spec:
  failurePolicy:
    maxRestarts: ${max_restarts}  # any other failure: recreate every slice, resume from the checkpoint
    rules:
    - action: FailJobSet  # exit 2 or 3 in any pod (podFailurePolicy below): stop for good
      onJobFailureReasons: [PodFailurePolicy]
  replicatedJobs:
  - name: slice
    replicas: ${slices}
    template:
      spec:
        parallelism: ${vms}
        completions: ${vms}
        completionMode: Indexed
        backoffLimit: 0  # a failed pod fails its slice's Job: the JobSet restarts all slices
        podFailurePolicy:
          rules:
          - action: FailJob
            onExitCodes:
              containerName: train
              operator: In
              values: [2, 3, 130]  # bad config/data/paths/storage, divergence: a restart cannot fix them; 130 a user's Ctrl-C
        template:
          spec:
            restartPolicy: Never
            hostNetwork: true
            dnsPolicy: ClusterFirstWithHostNet
            terminationGracePeriodSeconds: 120  # SIGTERM -> the run saves this step and exits 42
            nodeSelector:
              cloud.google.com/gke-tpu-accelerator: ${accelerator}
              cloud.google.com/gke-tpu-topology: ${topology}
            containers:
            - name: train
              image: ${image}
              workingDir: ${repo_dir}
              command:
${command_yaml%$'\n'}
              ports:
              - containerPort: 8471  # TPU runtime
              - containerPort: 8080  # multi-slice (megascale) runtime
              - containerPort: 8476  # jax.distributed coordinator
              env:
              - name: LIBTPU_INIT_ARGS
                value: '${TPU_XLA_FLAGS}'
              - name: JOBSET_NAME
                valueFrom: {fieldRef: {fieldPath: "metadata.annotations['jobset.sigs.k8s.io/jobset-name']"}}
              - name: REPLICATED_JOB_NAME
                valueFrom: {fieldRef: {fieldPath: "metadata.annotations['jobset.sigs.k8s.io/replicatedjob-name']"}}
              - name: MEGASCALE_SLICE_ID
                valueFrom: {fieldRef: {fieldPath: "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}
              - name: MEGASCALE_NUM_SLICES
                value: "${slices}"
              - name: MEGASCALE_COORDINATOR_ADDRESS  # pod 0 of slice 0 (the JobSet's headless service)
                value: "\$(JOBSET_NAME)-\$(REPLICATED_JOB_NAME)-0-0.\$(JOBSET_NAME)"
              resources:
                limits:
                  google.com/tpu: ${per_vm}
YAML
)
if [ -n "$apply" ]; then
  echo "launch/gke_jobset.sh: ${slices} x ${tpu} (${vms} pods of ${per_vm} chips per slice) as JobSet ${name}" >&2
  kubectl apply -f - <<<"$manifest"
else
  printf '%s\n' "$manifest"
fi
