#!/usr/bin/env bash
# Complete verification as a SLURM job array: one α,β-CROWN shard per array task, then a merge job.
#
#   sbatch --array=0-15 examples/slurm_verify.sh runs/cifar10-2-export
#   sbatch --dependency=afterany:<array job id> --wrap "ccdist verify --export runs/cifar10-2-export --merge"
#
# Task i (counted from the array's first id) runs `ccdist verify --shard i/N` with N = the array size (SLURM_ARRAY_TASK_COUNT), i.e. the
# instances r with r % N == i, on the GPU SLURM gives it. The export directory must be on a file
# system every node sees (else copy each node's EXPORT_DIR/verify/results_shard_*.jsonl into one
# folder before merging). A task that failed or was never run leaves its instances `missing` in
# the merged table: reported, not counted as certified; resubmit just that task
# (sbatch --array=5 ...) and merge again. Resubmitting a task skips the instances it finished.
#
#SBATCH --job-name=ccdist-verify
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=slurm-verify-%A_%a.out
set -euo pipefail
export_dir=${1:?usage: sbatch --array=0-N examples/slurm_verify.sh EXPORT_DIR [ccdist verify options]}
shift
: "${SLURM_ARRAY_TASK_ID:?run with sbatch --array=...}"
n=${SLURM_ARRAY_TASK_COUNT:-$((SLURM_ARRAY_TASK_MAX - SLURM_ARRAY_TASK_MIN + 1))}
# ABCROWN_DIR must point to alpha-beta-CROWN's complete_verifier folder (or pass --abcrown DIR)
i=$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))  # --array=1-16 works too
exec ccdist verify --export "$export_dir" --shard "$i/$n" "$@"
