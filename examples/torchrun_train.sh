#!/usr/bin/env bash
# Certified training with N processes (torch.distributed, one process per GPU or per CPU slot).
#
#   examples/torchrun_train.sh NPROC CONFIG TEACHER OUTPUT_DIR [more ccdist train options...]
#   examples/torchrun_train.sh 2 digits runs/digits-teacher/checkpoint.pt runs/digits-ddp --quiet
#   examples/torchrun_train.sh 4 cifar10-2 runs/cifar10-2-teacher/checkpoint.pt runs/cifar10-2 --set device=cuda
#
# optim.batch_size stays the global batch (each process takes batch_size / NPROC of it), so the
# epochs, ε/lr schedules and results are those of one process with the same config. CPU runs use
# gloo, `device: cuda` runs use nccl with process i on cuda:i. Re-running the same command with
# --resume continues an interrupted run (any number of processes; bit-exact with the same NPROC).
#
# Several machines: run this on every node with torchrun's rendezvous options instead of
# --standalone, e.g. --nnodes 2 --node-rank $NODE_RANK --rdzv-backend c10d --rdzv-endpoint HOST:29400
# (under SLURM: one `srun` task per node, NODE_RANK=$SLURM_NODEID, HOST the first node of the job).
set -euo pipefail
if [ $# -lt 4 ]; then
    sed -n '2,5p' "$0" >&2
    exit 1
fi
nproc=$1 config=$2 teacher=$3 out=$4
shift 4
# one BLAS thread per process unless the caller chose otherwise (N processes share the cores)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc-per-node "$nproc" -m ccdist_plugin.cli train \
    --config "$config" --teacher "$teacher" --output-dir "$out" "$@"
