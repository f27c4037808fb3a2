#!/usr/bin/env bash
# The reference run on one 2xA100 node: lil-39m, bf16, ZeRO-2, ~8B tokens in about 2 hours.
#   bash launch/pretrain_2xa100.sh                       # data/openwebtext prepared beforehand
#   bash launch/pretrain_2xa100.sh --train.lr 3e-4       # any override
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-1}          # single node: no InfiniBand needed
# Peer-to-peer: NCCL picks NVLink where the pair has it and PCIe otherwise (NCCL_P2P_LEVEL=NVL would turn
# it off on PCIe-only A100 pairs); set NCCL_P2P_LEVEL yourself only to restrict it.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}   # a hung rank fails the job
export TORCH_NCCL_AVOID_RECORD_STREAMS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PATH="$PATH:$PWD/.venv/bin"   # a deepspeed already on PATH first, else the checkout's .venv
# The rendezvous port: MASTER_PORT, else one free now (a second job on this machine must not collide on 29500).
PORT=${MASTER_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
exec deepspeed --master_port "$PORT" --num_gpus 2 launch/pretrain.py \
  --ds_config ds_configs/zero2.json \
  --config launch/configs/lil-39m-2xa100.yaml "$@"
