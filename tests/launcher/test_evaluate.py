"""Scoring, comparison and the progress report of launcher/evaluate.py (no model needed)."""

from launcher import evaluate as ev
from launcher.tasks import get_task


def test_progress_without_a_terminal_prints_a_line_per_batch(capsys):
    # Under nohup, `docker logs` or CI a rich bar draws nothing: the user still sees counts and time left.
    with ev.progress_bar("evaluating base", 200) as advance:
        advance(32)
        advance(168)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("evaluating base: 32/200 items") and "left" in lines[0]
    assert lines[1].startswith("evaluating base: 200/200 items")


def test_compare_counts_items_each_model_alone_got_right():
    task = get_task("gsm8k")
    refs = [3.0, 5.0, 7.0]
    base_records = ev.score(task, [_ex(r) for r in refs], ["#### 3", "#### 4", "nothing"])[1]
    trained_records = ev.score(task, [_ex(r) for r in refs], ["#### 2", "#### 5", "#### 7"])[1]
    out = ev.compare(base_records, trained_records)
    assert out["base"]["accuracy"] == 1 / 3 and out["trained"]["accuracy"] == 2 / 3
    assert out["base"]["answer_rate"] == 2 / 3 and out["trained"]["answer_rate"] == 1.0
    assert out["only_base_correct"] == 1 and out["only_trained_correct"] == 2


def _ex(reference):
    from launcher.tasks import Example

    return Example(question=f"q{reference}", target=f"#### {reference:g}", reference=reference, group="test")


def test_mixed_precision_evaluation_generates_on_a_half_copy_and_leaves_training_weights_fp32():
    import torch

    model = torch.nn.Linear(4, 4)
    with ev.inference_weights(model, "bf16") as weights:
        assert weights.weight.dtype == torch.bfloat16
    assert model.weight.dtype == torch.float32
    with ev.inference_weights(model, "fp32") as weights:
        assert weights is model
