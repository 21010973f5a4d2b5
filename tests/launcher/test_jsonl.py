"""JSON Lines: the writer's output reads back; bad input is named by file and line."""

import pytest

from launcher.errors import DataError
from launcher.jsonl import append_jsonl, read_jsonl, write_jsonl


def test_written_and_appended_records_read_back_in_order_with_their_line_numbers(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"q": "2 km in m?", "a": 2000}, {"q": "Größe", "a": None}])
    append_jsonl(path, {"step": 3})
    assert list(read_jsonl(path)) == [(1, {"q": "2 km in m?", "a": 2000}), (2, {"q": "Größe", "a": None}), (3, {"step": 3})]
    assert "Größe" in path.read_text(encoding="utf-8")  # UTF-8 text, not \\u escapes
    write_jsonl(path, [{"only": 1}])  # writing replaces
    assert list(read_jsonl(path)) == [(1, {"only": 1})]


def test_blank_lines_are_skipped_and_keep_the_numbering(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n')
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2})]


@pytest.mark.parametrize("content, message", [
    (b'{"a": 1}\n{"a": \n', r"p.jsonl:2: invalid JSON \(.*\)\. Fix: one JSON object per line\."),
    (b'{"a": "\xff"}\n', r"p.jsonl: not UTF-8 text\. Fix: save the file as UTF-8\."),
])
def test_bad_input_names_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        list(read_jsonl(path))


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(DataError, match=r"missing.jsonl: cannot read \(No such file or directory\)\. Fix: check the path\."):
        list(read_jsonl(tmp_path / "missing.jsonl"))
