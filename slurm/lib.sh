# shellcheck shell=bash
# Shared by the batch scripts in slurm/ (sourced, not run): starts one
# `fapool run` job step with one rank per task, resumes after a requeue, and
# turns Slurm's early-warning signal into a clean stop and a requeue.
#
# Slurm copies a batch script to its spool directory before running it, so
# this file is found through the working directory, which is the directory
# sbatch was called from (or --chdir): submit from the repository root.
#
# Settings, from the environment (sbatch exports the caller's environment):
#   FAPOOL_BIN          the fapool binary (default: target/release/fapool)
#   FAPOOL_LAUNCHER     srun (default: srun --mpi=pmix) or mpirun
#   FAPOOL_RESULTS_DIR  where results files go (default: results)
#   FAPOOL_REQUEUE      0 to stop without requeueing on the time-limit warning
#
# Seen working with Slurm 22.05 and Debian's Open MPI 4.1.4 (PMIx 4): both
# `srun --mpi=pmix` and `mpirun` inside the allocation start correctly
# numbered ranks; `srun --mpi=list` shows whether a cluster's Slurm has pmix.

# Prints category number $1 of job $2 (counting from 0) as an inline TOML
# table, e.g. {name="medium", lengths=[4096, 6144, 8192]}, taking the
# categories as fapool resolves them: the job's own, else the defaults, with
# any `--set` among the remaining arguments applied. `fapool validate` lists
# them (ranges expanded into their lengths) and needs no MPI, so it runs
# here in the batch shell.
fapool_category() {
  local index=$1 job=$2
  shift 2
  local bin=${FAPOOL_BIN:-target/release/fapool}
  local sets=()
  while (($#)); do
    case "$1" in
      --set) sets+=(--set "$2") && shift ;;
      --set=*) sets+=("$1") ;;
    esac
    shift
  done
  local listing lines
  listing=$("$bin" validate "$job" --ranks "${SLURM_NTASKS:-1}" "${sets[@]}") || return 2
  lines=$(sed -n 's/^category \([A-Za-z0-9_.-]*\): lengths \(\[[0-9, ]*\]\),.*/{name="\1", lengths=\2}/p' <<<"$listing")
  local count
  count=$(grep -c . <<<"$lines" || true)
  if ! [[ "$index" =~ ^[0-9]+$ ]] || ((index >= count)); then
    echo "fapool-slurm: $job has $count categories; there is no category $index" >&2
    return 2
  fi
  sed -n "$((index + 1))p" <<<"$lines"
}

# The batch scripts call this with the job's name (used in the results
# file's name), the job spec, then any further `fapool run` arguments.
fapool_step() {
  local name=$1 job=$2
  shift 2
  local bin=${FAPOOL_BIN:-target/release/fapool}
  local dir=${FAPOOL_RESULTS_DIR:-results}
  local launcher=${FAPOOL_LAUNCHER:-srun}

  [ -x "$bin" ] || {
    echo "fapool-slurm: no fapool binary at $bin (cargo build --release, or set FAPOOL_BIN)" >&2
    return 2
  }
  [ -f "$job" ] || {
    echo "fapool-slurm: no job spec $job (submit from the repository root)" >&2
    return 2
  }

  # The file name carries the Slurm job id, which a requeued job keeps, so a
  # restarted job finds the file its earlier run wrote and resumes it.
  local id=${SLURM_JOB_ID:?not inside a Slurm job}
  if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
    id=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
  fi
  local file="$dir/$name-$id.h5"
  mkdir -p "$dir"
  local output=(--out "$file")
  if [ -e "$file" ]; then
    output=(--resume "$file")
  fi

  # NVLink SHARP (multicast) collectives stay off: they need a fabric manager
  # set-up that shared clusters rarely give a job.
  export NCCL_NVLS_ENABLE=0

  local cmd
  case "$launcher" in
    srun)
      # srun inherits the task layout of the allocation (one task per GPU).
      cmd=(srun --mpi=pmix --kill-on-bad-exit=1)
      ;;
    mpirun)
      # mpirun reads the allocation's slots from Slurm. SLURM_NTASKS is passed
      # on so that ranks on other nodes, started under mpirun's own helper
      # step, see the job's task count rather than that step's.
      cmd=(mpirun -np "$SLURM_NTASKS" -x NCCL_NVLS_ENABLE -x SLURM_NTASKS)
      ;;
    *)
      echo "fapool-slurm: FAPOOL_LAUNCHER must be srun or mpirun, not $launcher" >&2
      return 2
      ;;
  esac
  cmd+=("$bin" run "$job" "${output[@]}" "$@")

  echo "fapool-slurm: job $id, restart ${SLURM_RESTART_COUNT:-0}, $SLURM_NTASKS tasks on ${SLURM_JOB_NODELIST:-?}"
  echo "fapool-slurm: ${cmd[*]}"

  # The step runs in the background so that this shell can take signals
  # while it runs: a shell waiting on a foreground command runs its traps
  # only after that command ends. `#SBATCH --signal=B:USR1@120` sends USR1
  # to this shell alone (B:), so the trap passes it on to the launcher,
  # which passes it to every rank; fapool then stops after the batch in
  # progress, saves what it measured and exits 7.
  local warned=0 step
  "${cmd[@]}" &
  step=$!
  trap 'warned=1; echo "fapool-slurm: time limit near, stopping the step"; kill -USR1 "$step" 2>/dev/null || true' USR1
  trap 'echo "fapool-slurm: terminated, stopping the step"; kill -TERM "$step" 2>/dev/null || true' TERM
  # `wait` returns early each time a trapped signal arrives; wait again
  # until the step has really ended, then read its status (bash keeps it).
  while kill -0 "$step" 2>/dev/null; do
    wait "$step" || true
  done
  local rc=0
  wait "$step" || rc=$?
  trap - USR1 TERM
  echo "fapool-slurm: step exited with $rc"

  # Exit 7 means "interrupted, measurements saved". After the time-limit
  # warning, put the job back in the queue: its next run resumes the file.
  # A SIGTERM (scancel, preemption) never requeues here; Slurm requeues
  # preempted --requeue jobs itself.
  if [ "$warned" = 1 ] && [ "$rc" = 7 ] && [ "${FAPOOL_REQUEUE:-1}" != 0 ]; then
    echo "fapool-slurm: requeueing job $SLURM_JOB_ID to resume $file"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$rc"
}
