#!/usr/bin/env bash
# The whole path on the built-in corpus (Python's own documentation, no network needed):
# tokenizer -> shards -> DeepSpeed ZeRO-2 pretraining on 2 ranks -> checkpoint -> a generated sample ->
# bits per byte on the held-out split and the built-in continuation task's accuracy.
# On CPU: two CPU ranks over gloo, fp32, a few minutes. With GPUs: every GPU, bf16 (ds_configs/zero2.json).
# MIX=1: the two-source variant, prose (pydoc) and code (the standard library's sources, data/code, prepared
# with the same tokenizer), mixed 80/20 then 50/50 for the last fifth (launch/configs/mix-debug.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" TOKENIZERS_PARALLELISM=false
MIX=${MIX:-0}
if [ "$MIX" = 1 ]; then RUN=${RUN:-runs/mix-debug}; else RUN=${RUN:-runs/debug}; fi
# The rendezvous port: MASTER_PORT, else one free now (a second job on this machine must not collide on 29500).
PORT=${MASTER_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
DATA=data/pydoc

if [ ! -f "$DATA/manifest.json" ]; then
  lillm train-tokenizer pydoc "$DATA.tokenizer" --vocab_size 4096
  lillm prepare pydoc "$DATA.tokenizer" "$DATA" --shard_tokens 262144 --val_fraction 0.02
fi
if [ "$MIX" = 1 ]; then
  if [ ! -f data/code/manifest.json ]; then
    lillm prepare stdlib "$DATA.tokenizer" data/code --shard_tokens 1048576 --val_fraction 0.02
  fi
  DATA_ARGS=(--config launch/configs/mix-debug.yaml)
  BPB="bpb:$DATA,bpb:data/code"
  PINS=(train/loss val/loss val/bpb val/pydoc/loss val/stdlib/loss)
else
  DATA_ARGS=(--config launch/configs/debug.yaml --data.dir "$DATA")
  BPB="bpb:$DATA"
  PINS=(train/loss val/loss val/bpb)
fi

if command -v nvidia-smi >/dev/null 2>&1 && NGPU=$(nvidia-smi -L 2>/dev/null | grep -c GPU) && [ "$NGPU" -gt 0 ]; then
  DS=ds_configs/zero2.json
else
  NGPU=2
  DS=ds_configs/zero2_cpu.json  # bf16 matmuls are slow on most CPUs: fp32 here
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}  # DeepSpeed's launcher would say it found no GPU, in each process
fi
deepspeed --master_port "$PORT" --num_gpus "$NGPU" launch/pretrain.py --ds_config "$DS" "${DATA_ARGS[@]}" \
  --train.run_dir "$RUN" "$@"

echo
echo "== a sample from $RUN =="
lillm generate "$RUN" "The module" --max_new_tokens 60 --temperature 0.8 --top_k 50
echo
echo "== evaluation of $RUN: bits per byte on the held-out split, the built-in task (chance 0.25) =="
lillm eval "$RUN" --tasks "$BPB,pydoc-continuation" --out "$RUN/eval.json"
echo
python -c 'import sys; from lillm.runs import tensorboard_hint; print(tensorboard_hint(sys.argv[1], sys.argv[2:]))' \
  "$RUN" "${PINS[@]}"
echo "Export:      lillm export $RUN exported/$(basename "$RUN")"
