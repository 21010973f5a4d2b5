"""Conversations -> token ids and labels through the tokenizer's chat template, the loss mask from token ids.

The mask comes from the rendered token ids, never from character offsets found by searching strings: the
conversation is rendered whole and, for each turn, rendered up to that turn (and, for an assistant turn, up
to its generation prompt); each of these renders is tokenized and must be a prefix of the whole's token ids.
An assistant turn's trained tokens are those between its generation prompt and its end: its text and its
end-of-turn token. Template glue after the end-of-turn token (the newline before the next `<|im_start|>`)
is not trained: the model never generates it, generation stops at the end-of-turn token.

transformers has `apply_chat_template(..., return_assistant_tokens_mask=True)`, but it only works for
templates that mark assistant text with `{% generation %}` (transformers 5.23,
utils/chat_template_utils.py, render_jinja_template: "return_assistant_tokens_mask==True but chat template
does not contain `{% generation %}` keyword"), which neither SmolLM2's template nor ChatML has.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import DataError

# ChatML, as SmolLM2 and Qwen write it, for models whose tokenizer has no template (data.chat_template=chatml).
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
ROLE_NAMES = ("system", "user", "assistant", "text")
CACHE_VERSION = "1"  # bump when the encoding below changes, so old cache files are not read


def prepare_tokenizer(tokenizer, chat_template: str | None, needs_template: bool) -> str:
    """Put data.chat_template on the tokenizer, or check it has its own; returns which template is used."""
    if chat_template == "chatml":
        missing = [t for t in CHATML_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            raise DataError(f"data.chat_template=chatml: the tokenizer has no {missing[0]} token, so ChatML's turn "
                            "markers would be split into pieces and the end of a turn never generated. Fix: give "
                            "data.chat_template a Jinja file written for this model's special tokens.")
        tokenizer.chat_template = CHATML
        if tokenizer.convert_tokens_to_ids("<|im_end|>") != tokenizer.eos_token_id:
            raise DataError("data.chat_template=chatml ends turns with <|im_end|>, but the tokenizer's EOS token is "
                            f"{tokenizer.eos_token!r}, so generation would not stop at the end of a turn. Fix: give "
                            "data.chat_template a Jinja file that ends turns with the EOS token.")
        return "chatml (data.chat_template)"
    if chat_template:
        path = Path(chat_template).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"data.chat_template={chat_template}: cannot read it ({exc}). Fix: give a Jinja file, or "
                            "'chatml'.") from None
        _check_compiles(text, f"data.chat_template={chat_template}")
        tokenizer.chat_template = text
        return f"{chat_template} (data.chat_template)"
    if not getattr(tokenizer, "chat_template", None):
        if needs_template:
            raise DataError("the model's tokenizer has no chat template (a base model?), and sftlaunch does not invent "
                            "a conversation format. Fix: data.chat_template=chatml, or data.chat_template=FILE.jinja "
                            "with the format the model should learn.")
        return "none (plain text only)"
    return "the tokenizer's own"


def _check_compiles(text: str, key: str) -> None:
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(text)
    except jinja2.TemplateError as exc:
        raise DataError(f"{key}: not a Jinja template ({exc}). Fix: correct the template file.") from None


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss
    roles: list[int]  # index into ROLE_NAMES of the turn each token belongs to (template glue included)


def _render(tokenizer, conversations: list[list[dict]], generation_prompt: bool) -> list[str]:
    if not conversations:
        return []
    return tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=generation_prompt)


def encode(examples, tokenizer, train_on: str) -> list[Encoded]:
    """Token ids, labels and the role of every token, for each example; text rows train on every token + EOS."""
    whole, prefixes, prompts = [], [], []  # renders: the whole conversation, each turn's end, each assistant's start
    for ex in examples:
        if ex.text is not None:
            continue
        msgs = [{"role": r, "content": c} for r, c in ex.messages]
        whole.append(msgs)
        # A turn followed by an assistant turn ends where that turn's generation prompt ends (rendered below):
        # one render and tokenisation fewer per assistant turn, a fifth of the time.
        prefixes += [msgs[: i + 1] for i in range(len(msgs) - 1) if msgs[i + 1]["role"] != "assistant"]
        prompts += [msgs[:i] for i, (r, _) in enumerate(ex.messages) if r == "assistant"]
    texts = _render(tokenizer, whole, False) + _render(tokenizer, prefixes, False) + _render(tokenizer, prompts, True)
    plain = [ex.text for ex in examples if ex.text is not None]
    # One batched call: the Rust tokenizer spreads it over the cores.
    ids = tokenizer(texts + plain, add_special_tokens=False)["input_ids"] if texts or plain else []
    n_whole, n_pref = len(whole), len(prefixes)
    it_whole, it_pref, it_prompt = iter(ids[:n_whole]), iter(ids[n_whole:n_whole + n_pref]), iter(ids[n_whole + n_pref:len(texts)])
    it_plain = iter(ids[len(texts):])
    special = set(tokenizer.all_special_ids)
    eos = tokenizer.eos_token_id
    out = []
    for ex in examples:
        if ex.text is not None:
            tokens = next(it_plain) + ([eos] if eos is not None else [])
            out.append(Encoded(tokens, list(tokens), [3] * len(tokens)))
            continue
        full = next(it_whole)
        labels, roles = [-100] * len(full), [0] * len(full)
        assistants = [i for i, (r, _) in enumerate(ex.messages) if r == "assistant"]
        ends = [None if ex.messages[i + 1][0] == "assistant" else next(it_pref) for i in range(len(ex.messages) - 1)]
        ends.append(full)
        starts = {i: next(it_prompt) for i in assistants}
        start = 0
        for i, (role, _) in enumerate(ex.messages):
            # The generation prompt (<|im_start|>assistant\n) is counted with the turn before it: masked either way.
            end = _prefix_length(ends[i] if ends[i] is not None else starts[i + 1], full, ex, i)
            roles[start:end] = [ROLE_NAMES.index(role)] * (end - start)
            if i in starts and (train_on == "assistant" or (train_on == "last_assistant" and i == assistants[-1])):
                begin = _prefix_length(starts[i], full, ex, i)
                stop = end
                # The turn's trained tokens end with its end-of-turn token: template glue after it is not generated.
                for j in range(end - 1, begin - 1, -1):
                    if full[j] in special:
                        stop = j + 1
                        break
                labels[begin:stop] = full[begin:stop]
            start = end
        if train_on == "all":
            labels = list(full)
        out.append(Encoded(full, labels, roles))
    return out


def _prefix_length(prefix: list[int], full: list[int], ex, turn: int) -> int:
    if full[: len(prefix)] != prefix:
        raise DataError(f"{ex.where}: turn {turn}: the chat template renders the conversation up to this turn as token "
                        "ids that are not a prefix of the whole conversation's (it rewrites earlier turns once later "
                        "ones follow), so the loss mask cannot be computed from token ids. Fix: data.chat_template="
                        "chatml, or a template that renders each turn the same whatever follows.")
    return len(prefix)


# ------------------------------------------------------------------------------------------------ the cache

def tokenizer_fingerprint(tokenizer) -> str | None:
    """A hash of the tokenizer's vocabulary, merges and special tokens (None for a slow tokenizer: no cache)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    state = json.loads(backend.to_str())
    for transient in ("truncation", "padding"):  # set and reset by each call of the tokenizer: not its identity
        state.pop(transient, None)
    h = hashlib.sha256(json.dumps(state, sort_keys=True).encode())
    h.update(json.dumps([tokenizer.eos_token_id, tokenizer.all_special_tokens], default=str).encode())
    return h.hexdigest()


def cache_dir() -> Path:
    root = os.environ.get("SFTLAUNCH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sftlaunch"
    return Path(root) / "chat-tokens"


def cache_key(examples, tokenizer, train_on: str) -> str | None:
    """The rows' content (their hashes, in order), the tokenizer, the template and train_on."""
    fp = tokenizer_fingerprint(tokenizer)
    if fp is None:
        return None
    h = hashlib.sha256(f"{CACHE_VERSION}\0{fp}\0{tokenizer.chat_template}\0{train_on}\0".encode())
    for ex in examples:
        h.update(ex.key.encode())
    return h.hexdigest()


def encode_cached(examples, tokenizer, train_on: str, use_cache: bool = True) -> tuple[list[Encoded], bool]:
    """encode(), read from the cache when the same rows were encoded with the same tokenizer and template;
    returns (encodings, whether they came from the cache)."""
    import numpy as np

    key = cache_key(examples, tokenizer, train_on) if use_cache else None
    path = cache_dir() / f"{key}.npz" if key else None
    if path is not None and path.exists():
        try:
            with np.load(path) as z:
                offsets, ids, labels, roles = z["offsets"], z["ids"], z["labels"], z["roles"]
        except (OSError, ValueError, KeyError) as exc:  # a torn write: say so, and encode again
            print(f"warning: the token cache {path} is unreadable ({exc}); encoding again", flush=True)
        else:
            if len(offsets) == len(examples) + 1:
                ids_l, labels_l, roles_l = ids.tolist(), labels.tolist(), roles.tolist()
                return [Encoded(ids_l[a:b], labels_l[a:b], roles_l[a:b])
                        for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())], True
    out = encode(examples, tokenizer, train_on)
    if path is not None:
        lengths = [len(e.input_ids) for e in out]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
        flat = lambda attr, dtype: np.fromiter((t for e in out for t in getattr(e, attr)), dtype=dtype, count=int(offsets[-1]))
        np.savez(tmp, offsets=offsets, ids=flat("input_ids", np.int32), labels=flat("labels", np.int32),
                 roles=flat("roles", np.int8))
        os.replace(tmp, path)  # whole or not at all: a reader never sees half a file
    return out, False
