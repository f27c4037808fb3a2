"""Direct preference optimisation of a fine-tuned lillm model with DeepSpeed.

    deepspeed --num_gpus 2 launch/dpo.py --ds_config ds_configs/zero2.json --config launch/configs/dpo-lil-39m.yaml
    python launch/dpo.py --config launch/configs/dpo-debug.yaml --ds_config ds_configs/zero2_cpu.json   # 1 process

YAML sections are init_from / data / train / lora / dpo; every option is in `--help`.
"""

try:
    from lillm.train.posttrain import main
except KeyboardInterrupt:  # Ctrl-C while Python loads torch and DeepSpeed: one line, no import traceback
    from lillm.errors import interrupted

    interrupted("dpo")

if __name__ == "__main__":
    main("dpo")
