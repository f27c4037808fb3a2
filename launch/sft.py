"""Supervised fine-tuning of a pretrained lillm model with DeepSpeed.

    deepspeed --num_gpus 2 launch/sft.py --ds_config ds_configs/zero2.json --config launch/configs/sft-lil-39m.yaml
    python launch/sft.py --config launch/configs/sft-debug.yaml --ds_config ds_configs/zero2_cpu.json   # 1 process

YAML sections are init_from / data / train / lora; every option is in `--help`.
"""

try:
    from lillm.train.posttrain import main
except KeyboardInterrupt:  # Ctrl-C while Python loads torch and DeepSpeed: one line, no import traceback
    from lillm.errors import interrupted

    interrupted("sft")

if __name__ == "__main__":
    main("sft")
