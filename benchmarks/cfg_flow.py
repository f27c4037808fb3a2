"""How configuration flows: follow `cfg` (the RunConfig and its model/data/train parts) from pretrain.build.

Every call into a lillm function that receives one of them (as an argument, or through an object in its
locals that holds one) is a stop. Reported: stops, distinct files, returns to a file already left, and climbs
(a call into a file that is higher up the call chain at the time: a callback into a caller's file).

    .venv/bin/python benchmarks/cfg_flow.py . data/pydoc     # a lillm tree, prepared shards
"""

import os
import shutil
import sys

tree, data = sys.argv[1], sys.argv[2]
sys.path.insert(0, tree)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch.distributed as dist  # noqa: E402

from lillm.train import pretrain  # noqa: E402

RUN = "/tmp/cfg-flow-run"
SKIP = {"__getattribute__", "<lambda>", "<genexpr>", "<listcomp>", "<dictcomp>"}


def holds(frame, watch: set[int]) -> bool:
    for v in frame.f_locals.values():
        if id(v) in watch:
            return True
        if hasattr(v, "__dict__") and not isinstance(v, type):
            try:
                if any(id(x) in watch for x in vars(v).values()):
                    return True
            except TypeError:
                pass
    return False


def main() -> None:
    cfg, yaml = pretrain.parse_config([
        "--config", f"{tree}/launch/configs/debug.yaml", "--ds_config", f"{tree}/ds_configs/zero2_cpu.json",
        "--data.dir", data, "--train.run_dir", RUN, "--train.max_steps", "1", "--data.num_workers", "0"])
    watch = {id(cfg), id(cfg.train), id(cfg.model), id(cfg.data)}
    stops = []

    def tracer(frame, event, arg):
        f = frame.f_code.co_filename
        if event == "call" and "/lillm/" in f and frame.f_code.co_name not in SKIP and holds(frame, watch):
            depth, g = 0, frame
            while g:
                depth, g = depth + 1, g.f_back
            stops.append((f.split("/lillm/")[1], frame.f_code.co_name, depth))

    shutil.rmtree(RUN, ignore_errors=True)
    sys.settrace(tracer)
    pretrain.build(cfg, yaml)
    sys.settrace(None)
    left, returns, climbs, chain, prev = set(), 0, 0, [], None
    for f, _, d in stops:
        while chain and chain[-1][1] >= d:
            chain.pop()
        if prev is not None and f != prev:
            returns += f in left
            left.add(prev)
            climbs += any(cf == f for cf, _ in chain[:-1]) and chain[-1][0] != f
        chain.append((f, d))
        prev = f
    print(f"{len(stops)} stops in {len({s[0] for s in stops})} files; returns to a file already left: {returns}; "
          f"climbs back up: {climbs}")
    for f, fn, d in stops:
        print(f"  {'  ' * min(d - stops[0][2], 12)}{f}:{fn}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
