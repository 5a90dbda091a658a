#!/usr/bin/env bash
# One `persona-gate reproduce` shard per task of a SLURM job array. Submit from the repository
# root, with as many tasks as shards (the array range sets N; any evenly stepped range works):
#
#   sbatch --array=1-4 scripts/slurm-array.sh MODEL.gguf runs/x [more reproduce flags...]
#
# Task K writes runs/x/shard-K; when every task has finished (e.g. a job submitted with
# --dependency=afterok:<array job id>), join them with
#
#   persona-gate merge -o runs/x runs/x/shard-*
#
# A task that is killed or preempted resumes where it stopped when resubmitted
# (sbatch --array=3 ... reruns shard 3 alone; finished groups are skipped).
# PERSONA_GATE sets the binary (default target/release/persona-gate); the thread count
# follows the CPUs SLURM gave the task.
#SBATCH --job-name=persona-gate
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: sbatch --array=1-N $0 MODEL.gguf RUN_DIR [reproduce flags...]" >&2; exit 2; }
model=$1 out=$2
shift 2
: "${SLURM_ARRAY_TASK_ID:?run this script with sbatch --array=1-N}"
exec "${PERSONA_GATE:-target/release/persona-gate}" reproduce -m "$model" \
  -t "${SLURM_CPUS_PER_TASK:-2}" --shard slurm -o "$out/shard-$SLURM_ARRAY_TASK_ID" "$@"
