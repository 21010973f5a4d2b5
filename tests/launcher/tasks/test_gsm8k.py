import json
import re
from pathlib import Path

import pytest

from launcher.errors import DataError
from launcher.recipe import load_recipe
from launcher.tasks import gsm8k
from tests.conftest import ROOT

GSM8K = gsm8k.BUNDLED  # the official splits, shipped inside the package


def _rows(split):
    return [json.loads(line) for line in (GSM8K / f"{split}.jsonl").read_text().splitlines()]


def test_local_folder_loads_the_official_splits():
    recipe = load_recipe(ROOT / "recipes" / "gsm8k.yaml", [f"data.path={GSM8K}", "data.calculator_annotations=false"])
    train, test = gsm8k.examples(recipe)
    assert (len(train), len(test)) == (7473, 1319)
    assert test[0].reference == 18 and test[0].target.endswith("#### 18")
    assert "<<" not in "".join(e.target for e in train)  # calculator annotations removed (the recipe keeps them)


def test_extractor_gets_every_test_reference_right():
    rows = _rows("test")
    assert len(rows) == 1319
    for row in rows:
        reference = float(row["answer"].rsplit("####", 1)[1].strip().replace(",", ""))
        # Both the raw solution (with <<...>> annotations) and the cleaned training target.
        assert gsm8k.parse_answer(row["answer"]) == reference
        assert gsm8k.is_correct(gsm8k.parse_answer(gsm8k.clean_solution(row["answer"])), reference)


@pytest.mark.parametrize("text, value", [
    ("so she has 5 + 3 = 8 apples.\n#### 8", 8),
    ("#### 1,234", 1234),
    ("#### -7", -7),
    ("#### 3.50", 3.5),
    ("The answer is $1,200.", 1200),
    ("First 2 then 3. The answer is 42.\nThanks!", 42),
    ("I think it is 17.", 17),
    ("#### 5\n#### 6", 6),                    # the last ####
    ("It costs $12.50 in total", 12.5),
    ("10-4 = 6", 6),                          # a hyphen after a digit is not a minus sign
    ("no numbers here", None),
    ("#### \nthe answer is 9", 9),            # nothing after ####: fall back
])
def test_extractor_on_messy_generations(text, value):
    assert gsm8k.parse_answer(text) == value


def test_exact_numeric_match():
    assert gsm8k.is_correct(18.0, 18)
    assert not gsm8k.is_correct(18.01, 18)
    assert not gsm8k.is_correct(None, 18)


def test_hub_code_path_through_datasets_on_a_local_dataset_repo(tmp_path):
    # A dataset repository laid out as on the Hub (configs in the README card), loaded by the same
    # `datasets.load_dataset(id, config, split=...)` call the product makes for openai/gsm8k.
    repo = tmp_path / "gsm8k-repo"
    (repo / "main").mkdir(parents=True)
    for split in ("train", "test"):
        (repo / "main" / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in _rows(split)[:20]) + "\n")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train.jsonl\n"
        "  - split: test\n    path: main/test.jsonl\n---\n")
    recipe = load_recipe(ROOT / "recipes" / "gsm8k.yaml", [f"data.dataset={repo}", "data.dataset_config=main"])
    assert recipe.data.path is None
    train, test = gsm8k.examples(recipe)
    assert len(train) == 20 and len(test) == 20 and test[0].reference == 18


def test_unreachable_hub_dataset_is_a_clear_error(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "gsm8k.yaml", [f"data.dataset={tmp_path / 'nope'}"])
    with pytest.raises(DataError, match="data.dataset=.*data.path"):
        gsm8k.examples(recipe)


def test_bad_files_name_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"question": "q", "answer": "a #### 1"}\n{"question": "q2", "answer": \n')
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON"):
        gsm8k.load_file(f)
    f.write_text('{"question": "q", "answer": "no final answer"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: 'answer' must"):
        gsm8k.load_file(f)
    f.write_text('{"answer": "#### 3"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: missing or empty 'question'"):
        gsm8k.load_file(f)
    f.write_text('{"question": "q", "answer": "#### many"}\n')
    with pytest.raises(DataError, match="not a number"):
        gsm8k.load_file(f)


def test_single_file_needs_an_eval_path(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "gsm8k.yaml", [f"data.path={GSM8K / 'train.jsonl'}"])
    with pytest.raises(DataError, match="eval.path"):
        gsm8k.examples(recipe)
    recipe = load_recipe(ROOT / "recipes" / "gsm8k.yaml", [f"data.path={GSM8K / 'train.jsonl'}", f"eval.path={GSM8K / 'test.jsonl'}"])
    assert len(gsm8k.examples(recipe)[1]) == 1319


def test_bundled_copy_is_checked_against_its_checksums(tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "gsm8k"
    shutil.copytree(gsm8k.BUNDLED, copy)
    monkeypatch.setattr(gsm8k, "BUNDLED", copy)
    gsm8k.verify_bundled(copy / "test.jsonl")  # intact: no error
    with open(copy / "test.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"question": "1 + 1?", "answer": "#### 2"}) + "\n")
    with pytest.raises(DataError, match="does not match SHA256SUMS"):
        gsm8k._load_split(str(copy), "test", "openai/gsm8k", "main")


def test_bundled_copy_ships_its_licence():
    assert "MIT License" in (gsm8k.BUNDLED / "LICENSE").read_text() and "OpenAI" in (gsm8k.BUNDLED / "LICENSE").read_text()
    assert len(_rows("train")) == 7473 and len(_rows("test")) == 1319


def test_evaluation_items_load_without_the_training_split(tmp_path, monkeypatch):
    recipe = load_recipe(ROOT / "recipes" / "gsm8k.yaml", [f"data.path={GSM8K}"])
    expected = gsm8k.examples(recipe)[1]
    loaded = []
    real = gsm8k._load_split
    monkeypatch.setattr(gsm8k, "_load_split", lambda path, split, *a: loaded.append(split) or real(path, split, *a))
    assert gsm8k.eval_examples(recipe) == expected  # what sftlaunch eval and export read
    assert loaded == ["test"]


def test_calculator_annotations_stay_in_targets_as_the_calculator_writes_them():
    recipe = load_recipe(ROOT / "recipes" / "gsm8k.yaml", [f"data.path={gsm8k.BUNDLED}", "data.calculator_annotations=true"])
    train, test = gsm8k.examples(recipe, str(gsm8k.BUNDLED))
    plain, _ = gsm8k.examples(load_recipe(ROOT / "recipes" / "gsm8k.yaml", [f"data.path={gsm8k.BUNDLED}", "data.calculator_annotations=false"]),
                              str(gsm8k.BUNDLED))
    assert sum("<<" in ex.target for ex in train) == 7378 and not any("<<" in ex.target for ex in plain)
    assert [ex.reference for ex in train] == [ex.reference for ex in plain]
    # Without the annotations the targets are today's; results are normalised: `<<8*18=144.00>>` -> `<<8*18=144>>`.
    assert [gsm8k.clean_solution(ex.target) for ex in train] == [ex.target for ex in plain]
    assert not any(re.search(r"<<[^>]*=[^>]*\.\d*0>>|<<[^>]*=\.", ex.target) for ex in train)
    assert "<<48/2=24>>24" in train[0].target
    assert sum("<<" in ex.target for ex in test) == 1301 and gsm8k.parse_answer(test[0].target) == test[0].reference


def test_error_kinds_tell_wrong_arithmetic_from_wrong_expressions():
    cases = {"48/2 = <<48/2=24>>24 clips, 24+10 = <<24+10=34>>34 #### 34": "correct",
             "48/2 = <<48/2=25>>25 clips #### 25": "wrong_arithmetic",  # the model's own result
             "48/2 = <<48/2=24>>24 clips #### 24": "wrong_expressions",  # right arithmetic, wrong question answered
             "<<2*x=6>>6 #### 6": "wrong_expressions",  # nothing to compute: not an arithmetic error
             "48/2 = 25 #### 25": "wrong_unannotated", "I do not know": "no_answer"}
    records = [{"generated": t, "parsed": gsm8k.parse_answer(t), "correct": gsm8k.is_correct(gsm8k.parse_answer(t), 34)}
               for t in cases]
    counts = gsm8k.error_kinds([], records)
    assert [r["error_kind"] for r in records] == list(cases.values())
    assert counts == {"correct": 1, "no_answer": 1, "wrong_arithmetic": 1, "wrong_expressions": 2, "wrong_unannotated": 1}
    # The reference solutions' 23,716 annotations hold no arithmetic error.
    rows = [json.loads(line) for line in (gsm8k.BUNDLED / "train.jsonl").read_text().splitlines()]
    assert {gsm8k.error_kind(r["answer"], False, 1.0) for r in rows} == {"wrong_expressions", "wrong_unannotated"}
