#!/usr/bin/env bash
# Run an evaluation config as SLURM jobs: one job per merge method (+ the references, + the Ensemble),
# each on one GPU, then collect their rows into the run's rows file and render report.md
# (src/evaluate/dispatch.py; the rows and report are the ones `python -m src.evaluate` writes).
#
#   bash scripts/slurm/evaluate_dispatch.sh configs/evaluate/A_knots_vitb32_lora.yaml          # in tmux on a login node
#   sbatch scripts/slurm/evaluate_dispatch.sh configs/evaluate/A_knots_vitb32_lora.yaml        # or as a small CPU job
#   PARTITION=a100 JOBS=4 TIME_MIN=480 bash scripts/slurm/evaluate_dispatch.sh configs/evaluate/C_cart_vitl14.yaml \
#       --rows results/C_vitl14/rows.jsonl --protocol cart                                     # any evaluate option
#   bash scripts/slurm/evaluate_dispatch.sh configs/evaluate/demo.yaml --executor local --jobs 2   # same jobs, local processes
#   bash scripts/slurm/evaluate_dispatch.sh CONFIG --dry_run true                             # list the jobs only
#   bash scripts/slurm/evaluate_dispatch.sh CONFIG --collect_only true                        # merge the parts again
#
# This script is the DISPATCHER: it submits the jobs with submitit (sbatch), waits for them (polling
# sacct), collects, and exits 1 naming any job that failed (its log: <rows>.parts/logs/<jobid>_0_log.err).
# It needs no GPU and little memory but lives as long as the sweep, hence the #SBATCH lines below for
# running it as a job of its own; on a login node run it inside tmux/screen. Running it again continues:
# every job skips the rows it already has. Wave 1 is the `references` job (finetuned / zero-shot rows,
# data statistics); wave 2 the method jobs and `ensemble`, at most JOBS at once (a SLURM job array).
# Jobs start in this directory with this Python; SETUP lines run first in each job (environment).
#
#SBATCH --job-name=eval-dispatch
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --mem=4G
#SBATCH --time=3-00:00:00
set -euo pipefail

CONFIG=${1:?usage: evaluate_dispatch.sh CONFIG.yaml [dispatch / evaluate options]}
shift
PARTITION=${PARTITION:-}            # empty: the cluster's default partition
GPUS=${GPUS:-1}                     # per job; an evaluation runs on one device
CPUS=${CPUS:-8}                     # per job: data loading, merges on the CPU
TIME_MIN=${TIME_MIN:-240}           # per job; a job that reaches it is requeued and resumes from its rows
JOBS=${JOBS:-}                      # at most this many jobs at once (default: all of a wave)
SETUP=${SETUP:-}                    # a shell line run at the start of each job, e.g. "module load cuda/12.4"
# PYTHON: the interpreter (default: python on PATH after the conda activation below)

cd "${SLURM_SUBMIT_DIR:-.}"
if command -v conda >/dev/null 2>&1 && [ -z "${NO_CONDA:-}" ]; then
  source "$(conda info --base)/etc/profile.d/conda.sh" && conda activate "${CONDA_ENV:-merging}"
fi

ARGS=(--config "$CONFIG" --executor slurm
      --slurm.gpus_per_node "$GPUS" --slurm.cpus_per_task "$CPUS" --slurm.timeout_min "$TIME_MIN")
[ -n "$PARTITION" ] && ARGS+=(--slurm.partition "$PARTITION")
[ -n "$JOBS" ] && ARGS+=(--jobs "$JOBS")
[ -n "$SETUP" ] && ARGS+=(--slurm.setup "[\"$SETUP\"]")
# later options win: "$@" may override any of the above (e.g. --executor local)
exec "${PYTHON:-python}" -m src.evaluate.dispatch "${ARGS[@]}" --progress false "$@"
