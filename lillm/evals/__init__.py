"""Evaluation: bits per byte on any text source and downstream multiple-choice and cloze tasks, for
`lillm eval` and for evaluation during training (`train.eval_tasks`). `tasks` names the tasks and reads
their items; `harness` scores them; `report` runs a list of tasks and writes what they found."""
