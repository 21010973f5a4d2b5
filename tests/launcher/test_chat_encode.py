"""The loss mask of conversations, from the rendered token ids: exactly the assistant turns and their end tokens."""

import pytest

from launcher.chat_data import to_example
from launcher.chat_encode import CHATML, encode, encode_cached, prepare_tokenizer
from launcher.errors import DataError

MULTI = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3 ft in m?"},
                      {"role": "assistant", "content": "0.9144"}, {"role": "user", "content": "and 2 ft?"},
                      {"role": "assistant", "content": "0.6096"}]}


@pytest.fixture
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def trained_pieces(enc, tokenizer) -> list[list[int]]:
    """Runs of consecutive trained positions, as token ids."""
    runs, current = [], []
    for token, label in zip(enc.input_ids, enc.labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_every_assistant_turn_and_its_end_token_is_trained_nothing_else(tok):
    enc = encode([to_example("messages", MULTI, "f:1")], tok, "assistant")[0]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert trained_pieces(enc, tok) == [ids(tok, "0.9144") + [end], ids(tok, "0.6096") + [end]]
    assert enc.input_ids == ids(tok, tok.apply_chat_template(MULTI["messages"], tokenize=False))
    # The newline after each <|im_end|> is template glue, masked; so is every system and user token.
    text = tok.decode([t for t, label in zip(enc.input_ids, enc.labels) if label == -100])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n3 ft in m?<|im_end|>\n<|im_start|>"
                    "assistant\n\n<|im_start|>user\nand 2 ft?<|im_end|>\n<|im_start|>assistant\n\n")


def test_last_assistant_and_all(tok):
    ex = to_example("messages", MULTI, "f:1")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert trained_pieces(encode([ex], tok, "last_assistant")[0], tok) == [ids(tok, "0.6096") + [end]]
    everything = encode([ex], tok, "all")[0]
    assert everything.labels == everything.input_ids


def test_chatml_for_a_tokenizer_without_a_template_gives_the_same_mask(tok):
    expected = encode([to_example("messages", MULTI, "f:1")], tok, "assistant")[0]
    tok.chat_template = None
    with pytest.raises(DataError, match=r"has no chat template .* Fix: data.chat_template=chatml"):
        prepare_tokenizer(tok, None, needs_template=True)
    assert prepare_tokenizer(tok, "chatml", True) == "chatml (data.chat_template)" and tok.chat_template == CHATML
    got = encode([to_example("messages", MULTI, "f:1")], tok, "assistant")[0]
    assert (got.input_ids, got.labels) == (expected.input_ids, expected.labels)


def test_a_jinja_file_with_another_format_is_masked_from_its_own_token_ids(tok, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{% if m['role'] == 'assistant' %}### Answer: {{ m['content'] }}"
                        "{{ eos_token }}{% else %}### {{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
                        "{% if add_generation_prompt %}### Answer:{% endif %}")
    prepare_tokenizer(tok, str(template), True)
    enc = encode([to_example("prompt_completion", {"prompt": "3 ft in m?", "completion": "0.9144"}, "f:1")], tok, "assistant")[0]
    full = ids(tok, "### user: 3 ft in m?\n### Answer: 0.9144<|im_end|>")
    assert enc.input_ids == full
    # The space before the answer belongs to the turn (the generation prompt ends at the colon).
    assert trained_pieces(enc, tok) == [full[len(ids(tok, "### user: 3 ft in m?\n### Answer:")):]]
    assert tok.decode(trained_pieces(enc, tok)[0]) == " 0.9144<|im_end|>"


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    # Renders "(last)" after the final turn only: turns up to the first reply are not a prefix of the whole.
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% if loop.last %} (last)"
                         "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(DataError, match=r"f:1: turn 0: the chat template renders .* not a prefix.*Fix: data.chat_template=chatml"):
        encode([to_example("messages", MULTI, "f:1")], tok, "assistant")


def test_plain_text_trains_on_every_token_and_eos(tok):
    enc = encode([to_example("text", {"text": "9 ft is 2.7432 m."}, "f:1")], tok, "assistant")[0]
    assert enc.input_ids == ids(tok, "9 ft is 2.7432 m.") + [tok.eos_token_id] and enc.labels == enc.input_ids


def test_the_second_encoding_of_the_same_rows_comes_from_the_cache(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLAUNCH_CACHE", str(tmp_path))
    rows = [to_example("messages", MULTI, "f:1"), to_example("text", {"text": "x y"}, "f:2")]
    first, hit1 = encode_cached(rows, tok, "assistant")
    second, hit2 = encode_cached(rows, tok, "assistant")
    assert (hit1, hit2) == (False, True) and second == first
    assert encode_cached(rows, tok, "last_assistant")[1] is False  # another mask, another key
    tok.chat_template = "{#- another version -#}" + CHATML
    assert encode_cached(rows, tok, "assistant")[1] is False  # another template, another key
