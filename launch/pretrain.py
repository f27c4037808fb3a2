"""Pretrain a lillm model with DeepSpeed.

    deepspeed --num_gpus 2 launch/pretrain.py --ds_config ds_configs/zero2.json --config launch/configs/debug.yaml
    python launch/pretrain.py --config launch/configs/debug.yaml --ds_config ds_configs/zero2_cpu.json   # 1 process

Every option is in `--help`; YAML sections are model / data / train, overridable as --train.lr 3e-4.
"""

try:
    from lillm.train.pretrain import main
except KeyboardInterrupt:  # Ctrl-C while Python loads torch and DeepSpeed: one line, no import traceback
    from lillm.errors import interrupted

    interrupted("pretrain")

if __name__ == "__main__":
    main()
