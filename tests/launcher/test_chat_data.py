"""Reading your own data: each format and file type, the per-file format, bad rows named by line, the split."""

import json

import pytest

from launcher import chat_data
from launcher.errors import DataError

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]
TURNS = (("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt, row, turns", [
    ("messages", {"messages": CONV}, TURNS),
    ("prompt_completion", {"prompt": "2+2?", "completion": "4"}, (("user", "2+2?"), ("assistant", "4"))),
    ("prompt_completion", {"prompt": CONV[:2], "completion": CONV[2:]}, TURNS),
    ("alpaca", {"instruction": "Add.", "input": "2+2", "output": "4"}, (("user", "Add.\n\n2+2"), ("assistant", "4"))),
    ("alpaca", {"instruction": "2+2?", "input": "", "output": "4", "system": "Be brief."}, TURNS),
    ("sharegpt", {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"},
                                    {"from": "gpt", "value": "4"}]}, TURNS),
])
def test_each_format_is_detected_from_its_keys_and_read_as_turns(tmp_path, fmt, row, turns):
    rows, formats = chat_data.load(str(write_jsonl(tmp_path / "d.jsonl", [row, row])))
    assert [f.format for f in formats] == [fmt]
    assert "detected from the keys of its first row" in formats[0].reason and "d.jsonl:1" in formats[0].reason
    assert rows[0].messages == turns and rows[0].reference == turns[-1][1]


def test_plain_text_rows_have_no_turns(tmp_path):
    rows, formats = chat_data.load(str(write_jsonl(tmp_path / "t.jsonl", [{"text": "Domain text."}])))
    assert formats[0].format == "text" and rows[0].text == "Domain text." and rows[0].reference is None


def test_json_array_parquet_csv_a_folder_and_a_list_of_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.json").write_text(json.dumps([{"messages": CONV}]))
    pq.write_table(pa.Table.from_pylist([{"instruction": "2+2?", "input": None, "output": "4"}]), tmp_path / "b.parquet")
    (tmp_path / "c.csv").write_text('prompt,completion\n"2+2, then?",4\n')
    rows, formats = chat_data.load(str(tmp_path))
    assert [(f.format, f.rows) for f in formats] == [("messages", 1), ("alpaca", 1), ("prompt_completion", 1)]
    assert rows[1].messages == (("user", "2+2?"), ("assistant", "4"))  # a null optional column is absent
    assert rows[2].messages[0] == ("user", "2+2, then?")
    listed, _ = chat_data.load([str(tmp_path / "c.csv"), str(tmp_path / "a.json")])
    assert [r.where.split(":")[0].rsplit("/", 1)[1] for r in listed] == ["c.csv", "a.json"]


def test_data_format_overrides_detection(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2?", "completion": "4"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: messages: missing, which a messages row needs"):
        chat_data.load(str(path), "messages")
    assert chat_data.load(str(path), "prompt_completion")[1][0].reason == "set by data.format"


def test_a_file_mixing_formats_names_the_first_differing_line(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [{"messages": CONV}, {"messages": CONV}, {"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match=r"mix.jsonl:3: completion, prompt: a prompt_completion row, but the file's "
                                        r"first row \(.*mix.jsonl:1\) is messages.*Fix: convert"):
        chat_data.load(str(path))


BAD_ROWS = [
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages: has no assistant turn", "add the assistant's reply"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, r"messages\[0\].role: unknown role 'bot'", "use one of system"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]},
     r"messages\[1\].role: a 'tool' turn", "remove those turns"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]},
     r"messages\[1\].role: is 'user' where 'assistant' was expected", "merge consecutive turns"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "c"}]},
     r"messages\[0\].content: is empty", "give it text"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "c"}]},
     r"messages\[0\].content: must be a string, got int", "write the text as a JSON string"),
    ({"prompt": "a", "completion": "b", "id": 3}, "id: a key .* that a prompt_completion row does not have", "remove it"),
    ({"question": "a", "answer": "b"}, "answer, question: these keys match no format", "use messages"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, r"conversations\[0\].from: unknown value 'bot'", "use one of"),
]


@pytest.mark.parametrize("row, message, fix", BAD_ROWS)
def test_a_bad_row_is_an_error_naming_file_line_key_and_fix(tmp_path, row, message, fix):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONV}, row] if "messages" in row else [row])
    line = 2 if "messages" in row else 1
    with pytest.raises(DataError, match=rf"d.jsonl:{line}: {message}.*Fix: {fix}"):
        chat_data.load(str(path))


def test_bad_bytes_are_errors_naming_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps({"messages": CONV}).encode() + b"\n{not json}\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: line: not JSON .*Fix: write one JSON object per line"):
        chat_data.load(str(path))
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: line: not UTF-8 \(byte 13 of the line is 0xe9\).*Fix: save the file as UTF-8"):
        chat_data.load(str(path))
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"d.jsonl: the file holds no rows. Fix: add rows"):
        chat_data.load(str(path))


def test_a_row_over_the_size_bound_is_an_error_not_a_memory_spike(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONV}, {"text": "x" * (10 * 1024 * 1024)}])
    with pytest.raises(DataError, match=r"d.jsonl:2: line: longer than 2 MiB.*Fix: split the row"):
        chat_data.load(str(path))


def test_a_parquet_file_with_other_columns_names_the_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"messages": CONV, "score": 0.5}]), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d.parquet: row 1: score: a key \(or column\) that a messages row does not "
                                        r"have.*Fix: remove it"):
        chat_data.load(str(tmp_path / "d.parquet"))


def _rows(n, start=0):
    return [chat_data.to_example("prompt_completion", {"prompt": f"q{i}", "completion": f"a{i}"}, f"f:{i}")
            for i in range(start, start + n)]


def test_the_split_is_stable_when_rows_are_appended_and_never_shares_a_row():
    first = chat_data.split(_rows(2000), 0.1, None)
    grown = chat_data.split(_rows(2000) + _rows(500, 2000), 0.1, None)
    assert 150 < len(first.evals) < 250  # about a tenth
    assert {e.key for e in first.evals} <= {e.key for e in grown.evals}
    assert {r.key for r in first.train} <= {r.key for r in grown.train}
    assert not {e.key for e in grown.evals} & {r.key for r in grown.train}
    # Duplicates land on one side: the hash is of the content.
    dup = chat_data.split(_rows(2000) + _rows(2000), 0.1, None)
    assert not {e.key for e in dup.evals} & {r.key for r in dup.train} and dup.duplicates_removed == 0


def test_the_split_caps_evaluation_at_eval_limit_and_removes_training_duplicates_of_eval_path_rows():
    capped = chat_data.split(_rows(2000), 0.1, 50)
    assert len(capped.evals) == 50 and capped.held_out_not_evaluated > 100
    assert len(capped.train) + 50 + capped.held_out_not_evaluated == 2000  # held out beyond the cap: not trained
    given = chat_data.split(_rows(100), 0.1, None, evals=_rows(10, 95))
    assert given.duplicates_removed == 5 and len(given.train) == 95 and given.source == "eval.path"
