"""Running a list of tasks and reporting: a markdown table on the terminal, JSON and markdown files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lillm.evals.harness import PreparedTask, Reduce, Scorer, run_task

HEADLINE = ("bpb", "acc_norm", "acc")
"""The metric a task is summarised by, first present wins."""


def evaluate(scorer: Scorer, tasks: list[PreparedTask], rank: int = 0, world: int = 1,
             reduce: Reduce | None = None, show_progress: bool = False) -> dict[str, dict[str, float]]:
    """Every task's metrics by its spec, each item or window scored on one rank and summed by `reduce`."""
    from tqdm.auto import tqdm

    results = {}
    for prepared in tasks:
        unit = "tok" if prepared.stream is not None else "req"
        with tqdm(total=prepared.size, desc=prepared.task.spec, unit=unit, leave=False, dynamic_ncols=True,
                  disable=None if show_progress and rank == 0 else True) as bar:  # None: on a terminal only
            results[prepared.task.spec] = run_task(scorer, prepared, rank, world, reduce, bar.update)
    return results


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return f"{int(value):,}" if isinstance(value, (int, float)) else str(value)


def markdown(results: dict[str, dict[str, float]]) -> str:
    """One row per task: its accuracies (with chance), or bits per byte and loss, and the item counts."""
    cols = ["bpb", "loss", "acc", "acc_stderr", "acc_norm", "chance", "perplexity", "items", "truncated", "tokens"]
    used = [c for c in cols if any(c in r for r in results.values())]
    lines = ["| task | " + " | ".join(used) + " |", "|---|" + "---|" * len(used)]
    for spec, r in results.items():
        lines.append(f"| {spec} | " + " | ".join(_fmt(r.get(c)) for c in used) + " |")
    return "\n".join(lines)


def headline(results: dict[str, dict[str, float]]) -> str:
    """One line: each task by its main figure, e.g. `bpb:pydoc 2.3101 bpb, pydoc-continuation acc_norm
    0.4100 (chance 0.25)`."""
    parts = []
    for spec, r in results.items():
        key = next(k for k in HEADLINE if k in r)
        extra = f" (chance {r['chance']:.2f})" if r.get("chance") is not None else ""
        parts.append(f"{spec} {key} {r[key]:.4f}{extra}")
    return ", ".join(parts)


def write_report(results: dict[str, dict[str, float]], out: str | Path, about: dict[str, Any]) -> tuple[Path, Path]:
    """OUT (JSON: `about` the model and run, and the results) and OUT with .md (the table); returns both."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**about, "results": results}, indent=2) + "\n")
    md = path.with_suffix(".md")
    header = f"# lillm eval: {about.get('model', '')}\n\n"
    md.write_text(header + markdown(results) + "\n")
    return path, md
