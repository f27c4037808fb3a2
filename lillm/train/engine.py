"""What every DeepSpeed training run shares: process group, device, optimizer, engine, signals, exit codes."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lillm.errors import UserError
from lillm.train.metrics import get_logger


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_world_size() -> int:
    """The number of ranks the launcher started (1 for a plain `python`), known before the process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


_LAUNCHERS: list[Any] | None = None  # DeepSpeed launcher processes above this rank, from start_process()
STALE_BUILD_LOCK_S = 600  # building DeepSpeed's CPU op takes about 100 s; a lock this old has no builder


def use_venv_extensions_dir() -> None:
    """Point DeepSpeed's JIT-built ops at <venv>/torch_extensions (where `launch/setup_env.sh` builds them
    once), unless TORCH_EXTENSIONS_DIR is set; and clear a build lock that no builder holds any more.

    torch's build lock is a bare file: a process killed while building leaves it, and every later launch
    then waits for it forever, silently. In a cache per venv the op is built once at setup, not by the
    first launch, so that window is closed; a lock older than any build is removed with a warning.
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None and os.access(sys.prefix, os.W_OK):
        root = os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    if root is None or not os.path.isdir(root):
        return
    for entry in os.scandir(root):
        lock = os.path.join(entry.path, "lock")
        try:
            age = time.time() - os.stat(lock).st_mtime
        except OSError:
            continue
        if age > STALE_BUILD_LOCK_S:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            print(f"lillm: removed a stale DeepSpeed build lock {lock} ({age / 60:.0f} min old: its build was "
                  "interrupted); the op is rebuilt if needed", file=sys.stderr, flush=True)
        else:
            print(f"lillm: waiting for a DeepSpeed op build in progress ({lock}); if no other process is "
                  "building, delete that file", file=sys.stderr, flush=True)


def build_ops() -> None:
    """Build DeepSpeed's CPU communication op into the venv now (setup time), where CPU ranks load it."""
    use_venv_extensions_dir()
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)


def init_distributed() -> tuple[int, int, int]:
    """Initialise the process group (also for a plain single-process `python launch/pretrain.py`)."""
    import deepspeed

    use_venv_extensions_dir()

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    expected = launched_world_size()
    deepspeed.init_distributed()
    if dist.get_world_size() != expected:
        raise UserError(f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE says {expected}")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def start_process() -> tuple[int, int, torch.device, logging.Logger]:
    """Join the process group: (rank, world size, this rank's device, the rank-aware logger)."""
    global _LAUNCHERS
    _LAUNCHERS = _launcher_ancestors()  # now, while they are all alive (StopFlag watches them)
    rank, world, local_rank = init_distributed()
    return rank, world, local_device(local_rank), get_logger(rank)


class StopFlag:
    """Set by SIGTERM/SIGINT, or when the `deepspeed` command that started this rank has exited (DeepSpeed's
    launcher dies on SIGTERM without passing it on, which left ranks training unattended); the loop
    finishes the step, saves and exits 0. `close()` puts the previous handlers back."""

    def __init__(self) -> None:
        self.signum = 0
        self.reason = ""
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        self._launchers = _LAUNCHERS if _LAUNCHERS is not None else _launcher_ancestors()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self.reason = f"received signal {signal.Signals(signum).name}"

    def requested(self) -> bool:
        """Whether to stop after this step (a local check; the loop agrees on it across ranks)."""
        if not self.signum and self._launchers and not all(_alive(p) for p in self._launchers):
            self.signum = signal.SIGTERM
            self.reason = "the deepspeed command that started this run has exited"
        return self.signum > 0

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _alive(process: Any) -> bool:
    """Running, and not a zombie (a dead launcher waits as one until whoever started it collects it)."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _launcher_ancestors() -> list[Any]:
    """This process's ancestors that are DeepSpeed launcher processes (none for a plain `python ...`)."""
    import psutil

    try:
        return [p for p in psutil.Process().parents() if any("deepspeed" in part for part in p.cmdline()[:4])]
    except psutil.Error:
        return []


def local_device(local_rank: int) -> torch.device:
    """This rank's device: its GPU under the CUDA accelerator, else the CPU."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() == "cpu":
        return torch.device("cpu")
    device = torch.device(accel.device_name(local_rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def param_groups(model: nn.Module, weight_decay: float, muon_weight_decay: float | None = None
                 ) -> list[dict[str, Any]]:
    """Weight decay on matrices (embeddings, projections, adapters), none on norm weights; frozen ones left out.
    With `muon_weight_decay` (optimizer muon), the Muon matrices (`is_muon_matrix`) form a group of their own
    with that decay."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = [p for n, p in trainable if muon_weight_decay is not None and is_muon_matrix(n, p)]
    in_muon = {id(p) for p in muon}
    decay = [p for n, p in trainable if p.dim() >= 2 and id(p) not in in_muon]
    no_decay = [p for n, p in trainable if p.dim() < 2]
    groups = [{"params": muon, "weight_decay": muon_weight_decay}] if muon else []
    return groups + [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def is_muon_matrix(name: str, param: torch.Tensor) -> bool:
    """Whether Muon trains this parameter: a matrix of the transformer blocks (attention and feed-forward
    projections, and LoRA adapters on them); the token embedding, the output head and norms stay on AdamW,
    as in Muon's design (it orthogonalises updates of hidden linear maps)."""
    return param.dim() == 2 and name.startswith("layers.")


def check_muon_tags(model: nn.Module, optimizer: Any) -> None:
    """After `deepspeed.initialize` with optimizer Muon: the engine runs DeepSpeed's MuonWithAuxAdam, its
    Muon groups hold exactly lillm's Muon matrices (DeepSpeed tags parameters by name), and the rest is in
    AdamW groups. Anything else is refused: a silent fallback would train another recipe than the one asked."""
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, MuonWithAuxAdam):
        raise UserError(f"train.optimizer muon: DeepSpeed built {type(inner).__name__}, not MuonWithAuxAdam")
    wrong = [n for n, p in model.named_parameters()
             if p.requires_grad and bool(getattr(p, "use_muon", False)) != is_muon_matrix(n, p)]
    if wrong:
        raise UserError(f"train.optimizer muon: DeepSpeed tagged {', '.join(wrong[:4])} differently from lillm "
                        "(Muon trains the blocks' matrices only); an untied output head is tagged by name as a "
                        "matrix: use model.tie_embeddings true")
    if not any(g.get("use_muon") for g in inner.param_groups):
        raise UserError("train.optimizer muon: no parameter group is trained by Muon")


def optimizer_summary(model: nn.Module, train: Any) -> str:
    """The optimizer in a few words, for the start-up line: which parameters Muon trains, at what peak lr."""
    if train.optimizer != "muon":
        return f"AdamW (lr {train.lr:g})"
    muon = [p for p in model.parameters() if p.requires_grad and getattr(p, "use_muon", False)]
    rest = [p for p in model.parameters() if p.requires_grad and not getattr(p, "use_muon", False)]
    return (f"Muon for {len(muon)} matrices ({sum(p.numel() for p in muon):,} weights, lr {train.muon_lr:g}) + "
            f"AdamW for {len(rest)} tensors (lr {train.lr:g})")


def eager_muon_update() -> None:
    """Run DeepSpeed's Muon update (momentum + Newton-Schulz) eagerly instead of through torch.compile.

    DeepSpeed wraps it in torch.compile, which costs about 30 s of compilation per process and shape on a
    CPU, where the update is a few small matmuls that the compiler does not speed up; with train.compile
    off (the CPU default) lillm compiles nothing, the Muon update included. The ZeRO optimizer imports the
    function from its module at every step, so replacing the module attribute is enough."""
    from deepspeed.runtime.zero.muon import original_muon

    original_muon.muon_update = getattr(original_muon.muon_update, "_torchdynamo_orig_callable",
                                        original_muon.muon_update)


def build_optimizer(ds_cfg: dict[str, Any], groups: list[dict[str, Any]], device: torch.device):
    """torch's AdamW, built here from the (filled) ds_config "optimizer" section, which is then removed; None
    where DeepSpeed builds the optimizer from that section (Muon, optimizer offload).

    Why not DeepSpeed's own FusedAdam/CPU Adam: it keeps beta^t as a running product and recomputes it with
    pow() after a resume, which differs in the last bit, so a resumed run drifts from the uninterrupted one.
    torch's AdamW derives the bias correction from the step count alone: resumes are bit-identical. With
    optimizer offload, ZeRO needs DeepSpeed's CPU Adam, so the JSON's optimizer is left to DeepSpeed. Muon
    must be DeepSpeed's (ZeRO-2 orthogonalises each matrix's whole gradient before partitioning it, which a
    client optimizer, seeing flat partitions, cannot); `fill_ds_config` makes its auxiliary Adam torch's
    AdamW (`torch_adam`) for the same exact resume.
    """
    offload = ds_cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if ds_cfg["optimizer"]["type"].lower() == "muon" or offload not in (None, "none"):
        return None
    params = ds_cfg.pop("optimizer")["params"]
    return torch.optim.AdamW(groups, lr=params["lr"], betas=tuple(params["betas"]), eps=params["eps"],
                             weight_decay=params["weight_decay"], fused=device.type in ("cuda", "cpu"))


def all_reduce(values: list[Any], device: torch.device, op: Any = None) -> list[float]:
    """Sum (or `op`) numbers over ranks, read back on the host: numbers or 0-dim tensors already on the device.
    A wait for the device: for log, eval and agreement steps only."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in values])
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def to_device(values: list[float], device: torch.device) -> torch.Tensor:
    """Host numbers as a float64 device tensor without waiting for the device (pinned, asynchronous copy)."""
    t = torch.tensor(values, dtype=torch.float64)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def initialize_engine(model: nn.Module, ds_cfg: dict[str, Any], groups: list[dict[str, Any]], device: torch.device,
                      ds_path: str) -> tuple[Any, Any]:
    """`deepspeed.initialize` with lillm's optimizer; DeepSpeed's own validation errors become UserErrors."""
    import deepspeed

    client_optimizer = build_optimizer(ds_cfg, groups, device)
    try:
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=client_optimizer, model_parameters=None if client_optimizer else groups,
            config=ds_cfg)
    except (ValueError, TypeError, AssertionError) as e:  # pydantic validation of the JSON, bad combinations
        raise UserError(f"DeepSpeed rejected {ds_path}: {e}") from None
    return engine, optimizer


def build_engine(model: nn.Module, train: Any, ds_cfg: dict[str, Any], ds_path: str,
                 device: torch.device) -> tuple[Any, Any]:
    """The model under a DeepSpeed engine as `train` asks: activation checkpointing, AdamW (or Muon and AdamW)
    groups, compile."""
    model.activation_checkpointing = train.activation_checkpointing
    muon = train.optimizer == "muon"
    groups = param_groups(model, train.weight_decay, train.muon_weight_decay if muon else None)
    compile_ = train.compile if train.compile is not None else device.type == "cuda"
    if muon and not compile_:
        eager_muon_update()
    engine, optimizer = initialize_engine(model, ds_cfg, groups, device, ds_path)
    if muon:
        check_muon_tags(model, optimizer)
    if compile_:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly, with a warning
        engine.compile()
    return engine, optimizer


def run_script(name: str, body) -> None:
    """Run a training entry point: a UserError becomes one line on stderr and exit 2; the process group is
    torn down either way."""
    import sys

    try:
        code = body()
    except UserError as e:
        print(f"{name}: error: {e}", file=sys.stderr, flush=True)
        code = 2
    except OSError as e:  # a full disk or a permission outside the checked paths: the path, no traceback
        if e.filename is None:
            raise
        print(f"{name}: error: {e.filename}: {e.strerror or e}", file=sys.stderr, flush=True)
        code = 2
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    if sys.argv[1:] != ["--build-ops"]:
        sys.exit("usage: python -m lillm.train.engine --build-ops")
    build_ops()
