#!/usr/bin/env bash
# Two real processes on the CPU (gloo), for development and tests: what N GPUs do, on a laptop.
#   bash launch/cpu_two_processes.sh --config configs/demo.yaml model.g_norm=none [overrides] [--resume auto]
# ACCELERATE_USE_CPU=1 is required: without it `--multi_gpu` on a machine without GPUs starts two independent
# single-process runs (the trainer refuses to start then). `accelerate launch --cpu --num_processes 2` starts ONE
# process. OMP_NUM_THREADS=1 keeps the two processes from fighting over the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
  --main_process_port "${PORT:-29511}" trainer/run.py "$@"
