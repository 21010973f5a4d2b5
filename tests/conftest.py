"""Shared fixtures: a tiny random Llama and an offline byte-level BPE tokenizer, built in code."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SUMMARY: list[str] = []  # lines tests want shown at the end of the run (e.g. the fuzzing count)
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def build_tiny_model(path: Path, calculator: bool = False) -> Path:
    """A 2-layer Llama (hidden 64) and a BPE tokenizer trained on unit-conversion text, saved to path; with
    `calculator`, on targets with calculator annotations (`7 * 12 = <<7*12=84>>84`), so it writes `<<EXPR=`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    import torch

    from launcher.tasks.unit_conversion import generate

    train, evals = generate(300, 30, seed=1, calculator=calculator)
    corpus = [f"Question: {e.question}\nAnswer: {e.target}" for e in train + evals]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    # As with SmolLM2: the pad token IS the EOS token, which is what makes label masking subtle.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    pretrain(model, fast, [f"{text}{fast.eos_token}" for text in corpus[: len(train)]])
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


PRETRAIN_STEPS, PRETRAIN_LR, PRETRAIN_BATCH = 120, 1e-2, 32


def pretrain(model, tokenizer, texts: list[str]) -> None:
    """A short full-parameter pre-training (about 10 s on one core), so the tiny model is a language model.

    A randomly initialised model writes one token over and over ('::::'), which is exactly what the
    collapse check fails a run for; after this its greedy answers follow the training format
    (' 9 ft in m: 1 ft = 1.04 m, so 9') and differ from question to question, as a real base model's do.
    """
    import torch

    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR)
    tokenizer.padding_side = "right"
    model.train()
    for _ in range(PRETRAIN_STEPS):
        rows = torch.randint(0, len(texts), (PRETRAIN_BATCH,), generator=generator).tolist()
        batch = tokenizer([texts[i] for i in rows], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_calculator_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-calculator"), calculator=True)


def write_tiny_recipe(path: Path, tiny_model: Path, train_size: int = 48, output_dir: Path | None = None) -> Path:
    """A recipe that trains the tiny model for a few steps and evaluates it on a handful of items."""
    path.write_text(f"""\
model:
  name: {tiny_model}
  lora: {{rank: 4, alpha: 8}}
data:
  train_size: {train_size}
  max_length: 96
train:
  max_steps: 4
  effective_batch_size: 8
  learning_rate: 1.0e-3
  logging_steps: 1
eval:
  size: 12
  batch_size: 6
  max_new_tokens: 16
""" + (f"output:\n  dir: {output_dir}\n" if output_dir else ""))
    return path


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model) -> Path:
    """A recipe that trains the tiny model for a few steps and evaluates it on a handful of items."""
    return write_tiny_recipe(tmp_path / "tiny.yaml", tiny_model, output_dir=tmp_path / "outputs")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run the real `sftlaunch` console entry point in a fresh process."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=full_env, timeout=timeout)


def pytest_terminal_summary(terminalreporter):
    for line in SUMMARY:
        terminalreporter.write_line(line)


FAULTS = Path(__file__).parent / "faults"  # its sitecustomize.py injects faults into every Python process


def fault_env(**faults) -> dict:
    """The environment that makes processes started with it inject the named faults (tests/faults)."""
    return {**{k.upper(): str(v) for k, v in faults.items()},
            "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")]))}


def built_deepspeed_op(folder, ninja: str | None = None) -> None:
    """What torch's JIT loader leaves in the extensions folder after building DeepSpeed's CPU op for this install."""
    import importlib.util
    from pathlib import Path

    import os
    import sysconfig

    ds, torch = (Path(importlib.util.find_spec(name).origin).parent for name in ("deepspeed", "torch"))
    folder.mkdir(parents=True, exist_ok=True)
    # The lines of torch's build.ninja (torch/utils/cpp_extension.py) that name this install and this machine.
    (folder / "build.ninja").write_text(ninja or (
        f"cxx = {os.environ.get('CXX', 'c++')}\n"
        f"cflags = -DTORCH_EXTENSION_NAME=deepspeed_shm_comm -isystem {torch / 'include'} "
        f"-isystem {sysconfig.get_path('include', scheme='posix_prefix')} -fPIC -O2 -fopenmp\n"
        f"build shm.o: compile {ds / 'ops/csrc/cpu/comm/shm.cpp'}\n"))
    (folder / "deepspeed_shm_comm.so").write_bytes(b"")
