#!/usr/bin/env bash
# Complete verification of an export directory with N parallel α,β-CROWN shards on one machine
# (one shard per GPU, or N CPU shards), then one merged table.
#
#   examples/multi_gpu_verify.sh EXPORT_DIR N [more ccdist verify options...]
#   examples/multi_gpu_verify.sh runs/digits-ddp-export 3                   # 3 CPU shards
#   examples/multi_gpu_verify.sh runs/cifar10-2-export 8 --timeout 600      # 8 GPUs
#
# Shard i runs the instances r with r % N == i (`ccdist verify --shard i/N`) with
# CUDA_VISIBLE_DEVICES=i when GPUs are present; results go to EXPORT_DIR/verify/results_shard_i_of_N.jsonl
# (append-only: rerun the same command after a crash and finished instances are skipped).
# `ccdist verify --merge` joins them into EXPORT_DIR/verification.json/.md; instances of a shard that
# died are reported as `missing`, never counted as certified. Needs ABCROWN_DIR (or --abcrown DIR).
set -uo pipefail
if [ $# -lt 2 ]; then
    sed -n '2,6p' "$0" >&2
    exit 1
fi
export_dir=$1 n=$2
shift 2
ngpu=$( (nvidia-smi -L 2>/dev/null || true) | grep -c "^GPU" || true)
mkdir -p "$export_dir/verify"
pids=()
for ((i = 0; i < n; i++)); do
    if [ "$ngpu" -gt 0 ]; then
        gpu=$((i % ngpu))
    else
        gpu=""
    fi
    CUDA_VISIBLE_DEVICES=$gpu ccdist verify --export "$export_dir" --shard "$i/$n" "$@" \
        > "$export_dir/verify/shard_${i}_of_${n}.log" 2>&1 &
    pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
    # exit 2: α,β-CROWN not found; 3: soundness alarm; anything else nonzero: the shard died
    if ! wait "${pids[$i]}"; then
        echo "shard $i/$n failed (see $export_dir/verify/shard_${i}_of_${n}.log)" >&2
        failed=1
    fi
done
ccdist verify --export "$export_dir" --merge
rc=$?
exit $((rc != 0 ? rc : failed))
