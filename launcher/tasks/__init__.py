"""Tasks: each builds its training and evaluation examples from a recipe and judges generations.

A task is a module with `examples(recipe, data_path) -> (train, evals)`, `eval_examples(recipe, data_path)`
(the evaluation items alone), `parse_answer(text) -> float | None`,
`is_correct(predicted, reference) -> bool`, `load_file(path) -> list[Example]` (for `eval --data`),
and `DEFAULT_MAX_LENGTH` with its reason (`ANNOTATED_MAX_LENGTH` where calculator annotations make targets longer).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    question: str
    target: str  # what the model is trained to write (the answer text, without EOS)
    reference: float
    group: str = "all"  # evaluation items can be reported by group (e.g. unseen phrasings)


def get_task(name: str):
    # Imported lazily: a task may pull in `datasets`, which the CLI's plan path should not load.
    if name == "unit_conversion":
        from launcher.tasks import unit_conversion as task
    elif name == "gsm8k":
        from launcher.tasks import gsm8k as task
    elif name == "chat":
        from launcher.tasks import chat as task
    else:
        raise KeyError(name)
    return task


def task_for(recipe):
    """The task that encodes, prompts and scores: a built-in task's module, or the chat task with the recipe's
    settings (chat template, train_on, eval.metrics)."""
    if recipe.data.task == "chat":
        from launcher.tasks.chat import ChatTask

        return ChatTask(recipe)
    return get_task(recipe.data.task)


TASK_NAMES = ("unit_conversion", "gsm8k", "chat")
