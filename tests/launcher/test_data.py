import json

import pytest

from launcher.data import build_examples, encode_examples
from launcher.tasks.unit_conversion import load_file as load_pairs_file
from launcher.errors import DataError
from launcher.models import load_tokenizer
from launcher.recipe import load_recipe
from launcher.tasks import Example
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


EX = Example("Convert 7 feet to meters.", "1 ft = 0.3048 m, so 7 * 0.3048 = 2.1336 <answer>2.1336</answer>", 2.1336)


def test_labels_mask_the_prompt_and_keep_answer_and_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the trap this guards against
    (f,), report = encode_examples([EX], tokenizer, 128, "plain")
    ids, labels = f["input_ids"], f["labels"]
    prompt_len = len(tokenizer("Question: " + EX.question + "\nAnswer:", add_special_tokens=False)["input_ids"])
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id  # EOS is trained
    assert tokenizer.decode(ids[prompt_len:-1]).strip() == EX.target
    assert report.as_dict()["trainable_tokens_min"] == len(ids) - prompt_len


def test_padding_uses_minus_100_for_labels_not_the_eos_id(tokenizer):
    from transformers import DataCollatorForSeq2Seq

    short = Example("1 B to KB", "<answer>0.001</answer>", 0.001)
    feats, _ = encode_examples([EX, short], tokenizer, 128, "plain")
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)(feats)
    row = batch["labels"][1].tolist()
    n = len(feats[1]["labels"])
    assert row[:n] == feats[1]["labels"] and set(row[n:]) == {-100}
    assert batch["input_ids"].shape[1] == max(len(f["input_ids"]) for f in feats)  # dynamic padding


def test_truncation_cuts_the_prompt_not_the_answer(tokenizer):
    long_q = Example("Please, " * 40 + "convert 7 feet to meters.", EX.target, EX.reference)
    (f,), report = encode_examples([long_q], tokenizer, 64, "plain")
    assert len(f["input_ids"]) == 64
    assert report.prompts_cut == 1
    target_len = sum(1 for x in f["labels"] if x != -100)
    assert tokenizer.decode(f["input_ids"][-target_len:-1]).strip() == EX.target


def test_answer_that_would_be_truncated_away_is_caught(tokenizer):
    with pytest.raises(DataError, match=r"1 of 1 samples would lose answer tokens at data.max_length=10.*raise data.max_length to \d+"):
        encode_examples([EX], tokenizer, 10, "plain")
    ok = Example("1 B to KB", "<answer>0.001</answer>", 0.001)
    feats, report = encode_examples([EX, ok], tokenizer, 16, "plain", on_truncation="drop")
    assert report.dropped == 1 and report.samples == 1 and len(feats) == 1
    assert "1 samples dropped" in report.render()
    with pytest.raises(DataError, match="no training sample"):
        encode_examples([EX], tokenizer, 10, "plain", on_truncation="drop")


def test_chat_prompt_format(tokenizer):
    (f,), _ = encode_examples([EX], tokenizer, 128, "chat")
    text = tokenizer.decode(f["input_ids"])
    assert text.startswith("<|im_start|>user\nConvert 7 feet") and "<|im_start|>assistant\n1 ft" in text


def test_pairs_file_loads_and_bad_files_name_the_problem(tmp_path):
    good = tmp_path / "d.json"
    good.write_text(json.dumps([["How many m in 2 km?", 2000], ["1 ft in m?", "0.3048"]]))
    exs = load_pairs_file(good)
    assert [e.reference for e in exs] == [2000.0, 0.3048]
    assert exs[0].target == "<answer>2000</answer>"
    bad = tmp_path / "bad.json"
    bad.write_text('[["q", 1],\n ["q2", ]]')
    with pytest.raises(DataError, match=r"bad.json:2: invalid JSON"):
        load_pairs_file(bad)
    bad.write_text(json.dumps([["q", "lots"]]))
    with pytest.raises(DataError, match="item 0"):
        load_pairs_file(bad)
    bad.write_text(json.dumps([["", 1]]))
    with pytest.raises(DataError, match="non-empty question"):
        load_pairs_file(bad)
    with pytest.raises(DataError, match="cannot read"):
        load_pairs_file(tmp_path / "missing.json")


def test_recipe_limits_and_files(tmp_path):
    f = tmp_path / "e.json"
    f.write_text(json.dumps([[f"q{i}", i + 1] for i in range(10)]))
    recipe = load_recipe(ROOT / "recipes" / "unit-conversion.yaml", [f"eval.path={f}", "eval.limit=4", "data.train_size=20"])
    train, evals = build_examples(recipe)
    assert len(train) == 20 and [e.question for e in evals] == ["q0", "q1", "q2", "q3"]


def test_data_size_counts_each_sample_not_the_batch_padding_its_tokenizer_file_carries(tmp_path, tiny_model):
    """SmolLM2's tokenizer.json pads every batch to its longest member; counted that way, GSM8K's plan said 512
    tokens a sample where the samples average 354, and the time prediction followed."""
    import shutil

    from tokenizers import Tokenizer

    from launcher.data import measure_size

    def copy(name: str, padded: bool):
        model = tmp_path / name
        shutil.copytree(tiny_model, model)
        tok = Tokenizer.from_file(str(model / "tokenizer.json"))
        if padded:
            tok.enable_padding(pad_id=0, pad_token="<pad>")  # BatchLongest, as SmolLM2's file has it
            tok.enable_truncation(max_length=8)
        else:
            tok.no_padding()
            tok.no_truncation()
        tok.save(str(model / "tokenizer.json"))
        return str(model)

    recipe = load_recipe(ROOT / "recipes" / "unit-conversion.yaml", ["data.train_size=16", "data.max_length=512"])
    size = measure_size(recipe, None, 512, copy("padded", True))
    plain = measure_size(recipe, None, 512, copy("plain", False))
    assert size.samples == plain.samples == 16
    assert (size.tokens, size.trainable_tokens, size.answer_tokens_max) == (
        plain.tokens, plain.trainable_tokens, plain.answer_tokens_max)


def test_data_size_keeps_the_longest_evaluation_prompt_which_sizes_the_evaluations_kv_cache(tiny_model):
    """Generation pads a batch to its longest prompt (longest first: launcher.data.batch_order), so the plan's
    predicted evaluation peak takes the longest evaluation prompt, counted with the model's tokenizer."""
    from transformers import AutoTokenizer

    from launcher.data import build_examples, format_prompt, measure_size

    recipe = load_recipe(ROOT / "recipes" / "unit-conversion.yaml", ["data.train_size=16", "eval.limit=12"])
    size = measure_size(recipe, None, 512, str(tiny_model))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    _, evals = build_examples(recipe, None)
    lengths = [len(tok(format_prompt(ex.question, None, "plain"), add_special_tokens=False).input_ids) for ex in evals]
    assert size.eval_items == len(lengths) == 12
    assert size.eval_prompt_tokens_max == max(lengths) > size.eval_prompt_tokens == round(sum(lengths) / 12)


def test_data_size_keeps_the_evaluations_reference_answers_in_the_order_the_evaluation_generates_them(tiny_model):
    """A first run's evaluation time (launcher.timing.answer_batches) takes each batch's longest reference answer:
    the references' token counts (+ EOS), in the order launcher.evaluate generates the prompts (longest first)."""
    from transformers import AutoTokenizer

    from launcher.data import batch_order, build_examples, format_prompt, measure_size

    recipe = load_recipe(ROOT / "recipes" / "unit-conversion.yaml", ["data.train_size=16", "eval.limit=12"])
    size = measure_size(recipe, None, 512, str(tiny_model))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    _, evals = build_examples(recipe, None)
    prompts = [format_prompt(ex.question, tok, recipe.data.prompt_format) for ex in evals]  # as evaluate() builds them
    answers = [len(tok(" " + ex.target, add_special_tokens=False).input_ids) + 1 for ex in evals]
    assert size.eval_answer_tokens == [answers[i] for i in batch_order(prompts)]
    assert len(set(size.eval_answer_tokens)) > 1 and size.eval_answer_tokens != answers  # the order matters here


def test_data_size_keeps_the_longest_training_sample_as_training_encodes_it(tiny_model):
    """Micro-batches are padded to their longest sample, so the plan's predicted training peak takes the data's
    longest sample as the training pipeline encodes it (launcher.data.encode_examples), at most data.max_length."""
    from transformers import AutoTokenizer

    from launcher.data import build_examples, encode_examples, measure_size

    recipe = load_recipe(ROOT / "recipes" / "unit-conversion.yaml", ["data.train_size=16", "eval.limit=12"])
    train, _ = build_examples(recipe, None)
    features, _ = encode_examples(train, AutoTokenizer.from_pretrained(tiny_model), 512, recipe.data.prompt_format)
    longest = max(len(f["input_ids"]) for f in features)
    assert min(len(f["input_ids"]) for f in features) < longest < 512  # the samples differ, none cut
    assert measure_size(recipe, None, 512, str(tiny_model)).sample_tokens_max == longest
    assert measure_size(recipe, None, longest - 3, str(tiny_model)).sample_tokens_max == longest - 3
