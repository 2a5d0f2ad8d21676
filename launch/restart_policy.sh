# Sourced by the launchers: sd3_run_with_restarts CMD... runs CMD (sd3-train) until it is done,
# restarting it after any exit except those that a restart cannot fix or that a user asked for:
#   0 done -> stop, 0
#   2 bad config, data, paths or storage (one line on stderr) -> stop, 2
#   3 NaN/Inf: the training diverged (the last good checkpoint is kept) -> stop, 3
#   130 stopped by Ctrl-C (the current step was committed): a user's stop -> stop, 130
#   anything else -> restart after SD3_RESTART_DELAY_S (default 10) seconds, at most
#     SD3_MAX_RESTARTS (default 100) times; e.g. 42 preempted (a checkpoint of the current step
#     was committed), 75 a peer process was lost, 134 SIGABRT (jax ends the other processes at
#     once when process 0, which runs its coordination service, is lost), 137 SIGKILL, 1 an
#     unexpected error (its traceback is above).
# SIGINT or SIGTERM to this shell (Ctrl-C, a scheduler) ends the loop once the run has stopped:
# the run itself saves and exits 42 on SIGTERM, and the loop passes that code on.
# One line per restart on stderr says why.

sd3_exit_meaning() {
  case "$1" in
    0) echo "done" ;;
    2) echo "bad config, data, paths or storage" ;;
    3) echo "the training diverged (NaN/Inf)" ;;
    42) echo "preempted; the checkpoint of the current step was committed" ;;
    75) echo "a peer process was lost" ;;
    130) echo "stopped by Ctrl-C (SIGINT) after committing the current step; a user's stop, not restarted" ;;
    134) echo "SIGABRT: jax ended this process, e.g. after losing process 0 (its coordination service)" ;;
    137) echo "SIGKILL: killed from outside, e.g. out of memory" ;;
    1) echo "an unexpected error (traceback above)" ;;
    *) if [ "$1" -gt 128 ]; then echo "signal $(($1 - 128))"; else echo "exit code $1"; fi ;;
  esac
}

sd3_run_with_restarts() {
  local max="${SD3_MAX_RESTARTS:-100}" delay="${SD3_RESTART_DELAY_S:-10}" restarts=0 code
  local stop=""
  trap 'stop=1' INT TERM
  while :; do
    code=0
    "$@" || code=$?
    if [ -n "$stop" ]; then
      echo "sd3_run_with_restarts: stopped by a signal; the run ended with exit $code ($(sd3_exit_meaning "$code"))" >&2
      return "$code"
    fi
    case "$code" in
      0 | 2 | 3 | 130) return "$code" ;;  # done, or nothing a restart fixes, or a user's Ctrl-C
    esac
    if [ "$restarts" -ge "$max" ]; then
      echo "sd3_run_with_restarts: exit $code ($(sd3_exit_meaning "$code")); not restarting: already restarted $restarts times (SD3_MAX_RESTARTS)" >&2
      return "$code"
    fi
    restarts=$((restarts + 1))
    echo "sd3_run_with_restarts: exit $code ($(sd3_exit_meaning "$code")); restarting in ${delay} s (restart $restarts of $max)" >&2
    sleep "$delay"
    if [ -n "$stop" ]; then
      return "$code"
    fi
  done
}
