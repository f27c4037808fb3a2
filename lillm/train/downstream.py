"""Evaluation tasks during training (`train.eval_tasks`): the tasks of `lillm eval`, read and encoded once
before the process group exists (so a bad spec or item fails first, on every rank), then scored at every
evaluation with each rank taking every world-th item or window and the sums added over ranks: the scores
are the same at any world size. Scoring runs without gradients and draws no random numbers, so turning it
on leaves the training losses as they were."""

from __future__ import annotations

from typing import Any

from lillm.evals.harness import PreparedTask, Scorer, prepare_task
from lillm.evals.report import evaluate
from lillm.evals.tasks import parse_task
from lillm.tokenizer import Tokenizer
from lillm.train.config import TrainConfig
from lillm.train.dist import Process, all_reduce

LOGGED = ("bpb", "acc", "acc_norm", "perplexity")
"""The metrics written as eval/TASK/METRIC (counts and standard errors stay in `lillm eval`'s report)."""


class TaskEvaluation:
    """train.eval_tasks, prepared for a model of context `max_len` and vocabulary `vocab_size`."""

    def __init__(self, train: TrainConfig, tokenizer: Tokenizer, max_len: int, vocab_size: int) -> None:
        limit = train.eval_task_limit or None
        self.tokenizer, self.max_len, self.vocab_size = tokenizer, max_len, vocab_size
        self.batch_size = train.micro_batch_size
        self.tasks: list[PreparedTask] = [prepare_task(parse_task(s), tokenizer, max_len, limit)
                                          for s in train.eval_tasks]

    def __bool__(self) -> bool:
        return bool(self.tasks)

    def __call__(self, engine: Any, process: Process) -> dict[str, float]:
        """Every task's logged metrics, as eval/NAME/METRIC; the same on every rank."""
        scorer = Scorer(engine, self.tokenizer, self.max_len, self.vocab_size, self.batch_size, process.device)
        results = evaluate(scorer, self.tasks, process.rank, process.world,
                           reduce=lambda xs: all_reduce(xs, process.device))
        names = {p.task.spec: p.task.name for p in self.tasks}
        return {f"eval/{names[spec]}/{k}": v for spec, r in results.items() for k, v in r.items() if k in LOGGED}
