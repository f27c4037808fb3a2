"""The model under a DeepSpeed engine: parameter groups, the optimizer (AdamW, or Muon with AdamW), compile."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lillm.errors import UserError
from lillm.train.ds_config import offloads_optimizer


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
    """The optimizer in a few words, for the start-up line: which parameters Muon trains, at what peak lr and
    weight decay."""
    if train.optimizer != "muon":
        return f"AdamW (lr {train.lr:g})"
    muon = [p for p in model.parameters() if p.requires_grad and getattr(p, "use_muon", False)]
    rest = [p for p in model.parameters() if p.requires_grad and not getattr(p, "use_muon", False)]
    decay = f", decay {train.muon_weight_decay:g}" if train.muon_weight_decay else ""
    return (f"Muon for {len(muon)} matrices ({sum(p.numel() for p in muon):,} weights, lr {train.muon_lr:g}{decay}) "
            f"+ AdamW for {len(rest)} tensors (lr {train.lr:g})")


def eager_muon_update() -> None:
    """Run DeepSpeed's Muon update (momentum + Newton-Schulz) eagerly instead of through torch.compile.

    DeepSpeed wraps it in torch.compile, which costs about 30 s of compilation per process and shape on a
    CPU, where the update is a few small matmuls that the compiler does not speed up; with train.compile
    off (the CPU default) lillm compiles nothing, the Muon update included. The ZeRO optimizer imports the
    function from its module at every step, so replacing the module attribute is enough."""
    from deepspeed.runtime.zero.muon import original_muon

    original_muon.muon_update = getattr(original_muon.muon_update, "_torchdynamo_orig_callable",
                                        original_muon.muon_update)


def lillm_builds_optimizer(ds_cfg: dict[str, Any]) -> bool:
    """Whether lillm builds the optimizer itself (torch's AdamW) rather than DeepSpeed from the JSON's section.

    Why torch's AdamW and not DeepSpeed's FusedAdam/CPU Adam: those keep beta^t as a running product and
    recompute it with pow() after a resume, which differs in the last bit, so a resumed run drifts from the
    uninterrupted one; torch's AdamW derives the bias correction from the step count alone, and resumes are
    bit-identical. DeepSpeed builds it where it must: with optimizer offload (ZeRO needs its CPU Adam) and for
    Muon (ZeRO-2 orthogonalises each matrix's whole gradient before partitioning it, which a client optimizer,
    seeing flat partitions, cannot; `fill_ds_config` makes its auxiliary Adam torch's AdamW, `torch_adam`)."""
    return ds_cfg["optimizer"]["type"].lower() != "muon" and not offloads_optimizer(ds_cfg)


def client_optimizer(ds_cfg: dict[str, Any], groups: list[dict[str, Any]], device: torch.device
                     ) -> torch.optim.Optimizer:
    """torch's AdamW with the hyperparameters of the filled ds_config's "optimizer" section."""
    params = ds_cfg["optimizer"]["params"]
    return torch.optim.AdamW(groups, lr=params["lr"], betas=tuple(params["betas"]), eps=params["eps"],
                             weight_decay=params["weight_decay"], fused=device.type in ("cuda", "cpu"))


def engine_config(ds_cfg: dict[str, Any], client_optimizer: bool, load_universal: bool = False) -> dict[str, Any]:
    """What `deepspeed.initialize` is given, derived from the filled config (which is left as it is): without
    the optimizer section where lillm passes its own optimizer (DeepSpeed takes one or the other), and set to
    load a universal checkpoint when the resume is one (`lillm.train.checkpoint.ResumePlan`)."""
    cfg = copy.deepcopy(ds_cfg)
    if client_optimizer:
        del cfg["optimizer"]
    if load_universal:
        cfg["checkpoint"] = {**cfg.get("checkpoint", {}), "load_universal": True}
    return cfg


def initialize_engine(model: nn.Module, ds_cfg: dict[str, Any], groups: list[dict[str, Any]], device: torch.device,
                      ds_path: str, load_universal: bool = False) -> tuple[Any, Any]:
    """`deepspeed.initialize` with lillm's optimizer where it builds one (`lillm_builds_optimizer`), else
    DeepSpeed's from the JSON; DeepSpeed's own validation errors become UserErrors."""
    import deepspeed

    optimizer = client_optimizer(ds_cfg, groups, device) if lillm_builds_optimizer(ds_cfg) else None
    try:
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=None if optimizer else groups,
            config=engine_config(ds_cfg, optimizer is not None, load_universal))
    except (ValueError, TypeError, AssertionError) as e:  # pydantic validation of the JSON, bad combinations
        raise UserError(f"DeepSpeed rejected {ds_path}: {e}") from None
    return engine, optimizer


def build_engine(model: nn.Module, train: Any, ds_cfg: dict[str, Any], ds_path: str, device: torch.device,
                 load_universal: bool = False) -> tuple[Any, Any]:
    """The model under a DeepSpeed engine as `train` asks: AdamW (or Muon and AdamW) groups, compile."""
    muon = train.optimizer == "muon"
    groups = param_groups(model, train.weight_decay, train.muon_weight_decay if muon else None)
    compile_ = train.compile if train.compile is not None else device.type == "cuda"
    if muon and not compile_:
        eager_muon_update()
    engine, optimizer = initialize_engine(model, ds_cfg, groups, device, ds_path, load_universal)
    if muon:
        check_muon_tags(model, optimizer)
    if compile_:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly, with a warning
        engine.compile()
    return engine, optimizer
