"""Reading, checking, tokenising and masking many short conversations (the chat task's pre-flight), cold and cached.

Writes N synthetic conversations (system, user, assistant; about 200 tokens each with the embedded SmolLM2
tokenizer) to a JSONL file, then times: reading and checking every row (launcher.chat_data.load), and
rendering + tokenising + masking them (launcher.chat_encode.encode_cached) with an empty token cache, then
again with the cache the first pass wrote. Target: the cold pass under 60 s for 100,000 on a 2-core CPU.

    .venv/bin/python benchmarks/chat_tokenize.py [--n 100000] [--model embedded:smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the of and to in is was for on that with as by at from his her an were which are this be has had one "
         "their not but all can also its new two first after time up other into year more most over only when "
         "meter mile gallon hour kilogram convert answer value factor number total price week month day").split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    args = ap.parse_args()

    import os

    from launcher.chat_data import load
    from launcher.chat_encode import encode_cached
    from launcher.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(args.model))
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SFTLAUNCH_CACHE"] = tmp  # an empty cache: the first pass is cold
        data = Path(tmp) / "conversations.jsonl"
        with open(data, "w") as f:
            for _ in range(args.n):
                f.write(json.dumps({"messages": [
                    {"role": "system", "content": sentence(rng, 8)},
                    {"role": "user", "content": sentence(rng, 60)},
                    {"role": "assistant", "content": sentence(rng, 100)}]}) + "\n")
        t0 = time.perf_counter()
        rows, _ = load(str(data))
        t_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        cold, hit = encode_cached(rows, tokenizer, "assistant")
        t_cold = time.perf_counter() - t0
        assert not hit
        t0 = time.perf_counter()
        warm, hit = encode_cached(rows, tokenizer, "assistant")
        t_warm = time.perf_counter() - t0
        assert hit and warm == cold
    tokens = sum(len(e.input_ids) for e in cold)
    trained = sum(sum(label != -100 for label in e.labels) for e in cold)
    print(f"{args.n} conversations, {tokens / args.n:.0f} tokens each on average ({trained / tokens:.0%} trained)")
    print(f"read and check rows:            {t_read:6.1f} s")
    print(f"render + tokenise + mask, cold: {t_cold:6.1f} s  ({args.n / t_cold:,.0f} conversations/s)")
    print(f"the same from the cache:        {t_warm:6.1f} s  ({t_cold / t_warm:.1f}x faster)")
    print(f"cold total (read + encode):     {t_read + t_cold:6.1f} s")


if __name__ == "__main__":
    main()
