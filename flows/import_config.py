"""`loraforge import-config AXOLOTL.yaml`: an Axolotl config turned into a loraforge config.

Every Axolotl key is either carried over to the loraforge setting with the same meaning, carried over with a
changed meaning (listed), or not carried over (listed, with the reason and the closest loraforge setting where
there is one). Keys written without a value are unset in Axolotl too; they are named once, together. What
loraforge cannot honour at all (preference training, a dataset type it has no format for, a value out of range)
is an error naming the Axolotl file and line; all such problems are reported at once. The result is checked
with loraforge's own config model before it is written. docs/axolotl.md has the whole mapping table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loraforge.tasks.errors import ConfigError

LINEAR = "all-linear"
# Axolotl optimizer -> loraforge train.optimizer (same algorithm; fused/torch variants differ in speed only).
OPTIMIZERS = {
    "adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
    "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw", "paged_adamw": "paged_adamw",
}  # fmt: skip
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
# Axolotl dataset type -> loraforge data.format.
DATASET_TYPES = {"alpaca": "alpaca", "chat_template": "chat", "chat_template.default": "chat", "completion": "text"}
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_LENGTH = 32768  # data.max_length's upper bound

# Scalar keys with the same meaning: Axolotl key -> (loraforge key, type).
SAME: dict[str, tuple[str, type]] = {
    "lora_r": ("train.r", int),
    "lora_alpha": ("train.alpha", int),
    "lora_dropout": ("train.dropout", float),
    "micro_batch_size": ("train.batch_size", int),
    "gradient_accumulation_steps": ("train.grad_accum", int),
    "num_epochs": ("train.epochs", float),
    "max_steps": ("train.max_steps", int),
    "learning_rate": ("train.learning_rate", float),
    "warmup_ratio": ("train.warmup_ratio", float),
    "weight_decay": ("train.weight_decay", float),
    "max_grad_norm": ("train.max_grad_norm", float),
    "sample_packing": ("train.packing", bool),
    "group_by_length": ("train.group_by_length", bool),
    "peft_use_dora": ("train.use_dora", bool),
    "peft_use_rslora": ("train.use_rslora", bool),
    "loraplus_lr_ratio": ("train.loraplus_lr_ratio", float),
    "lora_modules_to_save": ("train.modules_to_save", list),
    "logging_steps": ("train.log_every", int),
    "save_total_limit": ("train.keep_checkpoints", int),
    "early_stopping_patience": ("train.early_stopping_patience", int),
    "auto_resume_from_checkpoints": ("train.resume", bool),
    "train_on_inputs": ("data.train_on_prompt", bool),
    "sequence_len": ("data.max_length", int),
    "eval_batch_size": ("eval.batch_size", int),
    "eval_max_new_tokens": ("eval.max_new_tokens", int),
    "hub_private_repo": ("publish.private", bool),
}
# Keys loraforge has no setting for: Axolotl key (or prefix ending in _) -> (reason, closest loraforge setting).
NOT_CARRIED: dict[str, tuple[str, str | None]] = {
    "tf32": ("loraforge does not switch on TF32 matmuls", None),
    "bfloat16": ("loads the model in bf16; loraforge sets one dtype for weights and autocast", "train.precision"),
    "float16": ("loads the model in fp16; loraforge sets one dtype for weights and autocast", "train.precision"),
    "attn_implementation": ("loraforge uses transformers' default attention (sdpa)", None),
    "flash_attention": ("loraforge uses transformers' default attention (sdpa)", None),
    "sdp_attention": ("loraforge uses transformers' default attention (sdpa)", None),
    "xformers_attention": ("loraforge uses transformers' default attention (sdpa)", None),
    "model_type": ("loraforge loads the Auto class named by the model's config.json", None),
    "tokenizer_type": ("loraforge loads the model's own tokenizer (AutoTokenizer)", None),
    "trust_remote_code": ("loraforge never runs a model repo's own code", None),
    "dataset_prepared_path": ("the data stage caches its artifact in the store, keyed by its inputs", "store"),
    "eval_sample_packing": ("validation loss is measured on unpacked rows", None),
    "pad_to_sequence_len": ("micro-batches are padded to their longest row (or packed)", "train.packing"),
    "evals_per_epoch": ("loraforge counts in optimizer steps", "train.eval_every"),
    "saves_per_epoch": ("loraforge counts in optimizer steps", "train.save_every"),
    "eval_steps": ("not a whole number of steps", "train.eval_every"),
    "save_steps": ("not a whole number of steps", "train.save_every"),
    "resume_from_checkpoint": ("a run resumes from its own last checkpoint", "train.resume"),
    "lora_model_dir": ("loraforge does not start from an existing adapter", None),
    "loss_watchdog_threshold": ("no loss watchdog; a NaN loss stops training", None),
    "loss_watchdog_patience": ("no loss watchdog; a NaN loss stops training", None),
    "gradient_checkpointing_kwargs": ("loraforge picks the checkpointing mode itself", None),
    "ddp_find_unused_parameters": ("set by loraforge's distributed setup", None),
    "unfrozen_parameters": ("only LoRA weights (and train.modules_to_save) are trained", "train.modules_to_save"),
    "fsdp": ("processes are set in loraforge, not by a launcher", "train.fsdp with train.processes"),
    "fsdp_version": ("loraforge's FSDP is FSDP2", "train.fsdp"),
    "deepspeed": ("loraforge shards with FSDP2, not DeepSpeed", "train.fsdp with train.processes"),
    "special_tokens": ("loraforge keeps the tokenizer's special tokens (pad: the tokenizer's, else EOS)", None),
    "tokens": ("loraforge does not add tokens to the vocabulary", None),
    "eot_tokens": ("the end of a turn is what the chat template renders", "data.chat_template"),
    "chat_template_jinja": ("only the tokenizer's template or a registry name can be used", "data.chat_template"),
    "adam_beta1": ("AdamW uses torch's default betas", None),
    "adam_beta2": ("AdamW uses torch's default betas", None),
    "adam_epsilon": ("AdamW uses torch's default epsilon", None),
    "lora_fan_in_fan_out": ("PEFT detects Conv1D layers itself", None),
    "strict": ("loraforge's config is always strict: an unknown key is an error", None),
    "hub_strategy": ("the publish stage pushes the finished, gated adapter once", None),
    "wandb_": ("run metrics go to the run record and Prefect", None),
    "mlflow_": ("run metrics go to the run record and Prefect", None),
    "comet_": ("run metrics go to the run record and Prefect", None),
    "fsdp_": ("FSDP is one switch in loraforge", "train.fsdp"),
}
# Values of keys above that are loraforge's fixed behaviour anyway: nothing is lost, nothing is listed.
SAME_AS_LORAFORGE = {("tf32", False), ("strict", False), ("lora_fan_in_fan_out", False),
                     ("trust_remote_code", False), ("pad_to_sequence_len", False),
                     ("eval_sample_packing", False)}  # fmt: skip
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Note:
    """One Axolotl key that was not carried over, or carried over with a changed meaning."""

    where: str  # file:line
    key: str  # Axolotl key, e.g. datasets[0].field_messages
    reason: str
    closest: str | None = None  # the closest loraforge setting

    @property
    def line(self) -> int:
        """The Axolotl line, for ordering notes as the file reads."""
        return int(self.where.rsplit(":", 1)[1])

    def __str__(self) -> str:
        hint = f"; closest loraforge setting: {self.closest}" if self.closest else ""
        return f"{self.where}: {self.key}: {self.reason}{hint}"


@dataclass
class Imported:
    """What the conversion produced: the loraforge config tree and everything a reader must know about it."""

    config: dict[str, Any]
    dropped: list[Note] = field(default_factory=list)  # not carried over
    changed: list[Note] = field(default_factory=list)  # carried over with a changed meaning
    empty: list[str] = field(default_factory=list)  # Axolotl keys written without a value
    defaults: list[str] = field(default_factory=list)  # loraforge settings chosen where Axolotl has none
    carried: dict[str, str] = field(default_factory=dict)  # loraforge key -> the Axolotl key it came from
    as_is: list[str] = field(default_factory=list)  # Axolotl keys whose value is loraforge's behaviour anyway

    def to_yaml(self, source: str) -> str:
        """The config as YAML, with every note as a comment at the top."""
        head = [f"# Converted from the Axolotl config {source} by `loraforge import-config`.",
                "# Check it: loraforge validate THIS.yaml; run it: loraforge run THIS.yaml", "#"]  # fmt: skip
        for title, notes in (("Not carried over", self.dropped), ("Carried over with a changed meaning", self.changed)):
            if notes:
                head += [f"# {title} ({len(notes)}):", *(f"#   - {n}" for n in self.notes(notes)), "#"]
        if self.defaults:
            head += ["# Set here because Axolotl has no such setting:", *(f"#   - {d}" for d in self.defaults), "#"]
        if self.empty:
            head.append(f"# Empty in the Axolotl config (unset there too): {', '.join(self.empty)}")
        order = ["name", "base_model", "store", "data", "train", "eval", "merge", "quantize", "publish"]
        ordered = {k: self.config[k] for k in sorted(self.config, key=lambda k: (order + [k]).index(k))}
        body = yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True, width=120)
        return "\n".join(head).rstrip("#\n") + "\n\n" + body

    @staticmethod
    def notes(notes: list[Note]) -> list[Note]:
        """Notes in the order of the Axolotl file."""
        return sorted(notes, key=lambda n: n.line)


class _Converter:
    """State of one conversion: the output tree, the notes and the problems, each tied to an Axolotl line."""

    def __init__(self, source: str, raw: dict[str, Any], lines: dict[tuple[str, ...], int]) -> None:
        self.source, self.raw, self.lines = source, raw, lines
        self.out: dict[str, Any] = {}
        self.result = Imported(self.out)
        self.origin = self.result.carried  # loraforge dotted key -> the Axolotl key it came from
        self.problems: list[str] = []

    def where(self, key: str) -> str:
        path = tuple(key.replace("[", ".").replace("]", "").split("."))
        for depth in range(len(path), 0, -1):
            if path[:depth] in self.lines:
                return f"{self.source}:{self.lines[path[:depth]]}"
        return f"{self.source}:1"

    def set(self, dotted: str, value: Any, key: str) -> None:
        node = self.out
        *sections, last = dotted.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = value
        self.origin[dotted] = key

    def drop(self, key: str, reason: str, closest: str | None = None) -> None:
        self.result.dropped.append(Note(self.where(key), key, reason, closest))

    def change(self, key: str, reason: str, closest: str | None = None) -> None:
        self.result.changed.append(Note(self.where(key), key, reason, closest))

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.where(key)}: {key}: {message}")


def import_axolotl(path: str | Path) -> Imported:
    """Convert an Axolotl YAML config into a loraforge config tree with its notes.

    Args:
        path: the Axolotl config file.

    Returns:
        The loraforge config (validated by loraforge's config model) and the lists of keys not carried over,
        carried over with a changed meaning, or empty.

    Raises:
        ConfigError: the file cannot be read, is not YAML or not a mapping, has no base_model, or asks for what
            loraforge cannot do (every such problem listed with file:line).
    """
    raw, lines = _read(Path(path))
    conv = _Converter(str(path), raw, lines)
    conv.set("name", Path(path).stem, "(file name)")
    _model(conv)
    _data(conv)
    _adapter(conv)
    _precision(conv)
    _schedule(conv)
    _publish(conv)
    for key, value in raw.items():
        if key not in HANDLED:
            _other(conv, key, value)
        elif value is None or value in ("", [], {}):
            conv.result.empty.append(key)
        elif value is False and key not in conv.origin.values():  # load_in_8bit: false, lora_target_linear: false
            conv.result.as_is.append(key)
    _eval_defaults(conv)
    _check(conv)
    return conv.result


def _read(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    from loraforge.tasks.config import read_yaml

    if not path.is_file():
        raise ConfigError(f"{path}: not found; give the Axolotl config file (YAML) to convert.")
    raw, lines = read_yaml(path, "an Axolotl config maps keys (base_model, datasets, ...)")
    if not isinstance(raw.get("base_model"), str) or not raw["base_model"].strip():
        where = f"{path}:{lines[('base_model',)]}" if ("base_model",) in lines else f"{path}:1"
        raise ConfigError(f"{where}: base_model is missing or empty; an Axolotl config names the model to tune "
                          "(base_model: org/name).")  # fmt: skip
    return raw, lines


def _model(conv: _Converter) -> None:
    raw = conv.raw
    base = raw["base_model"].strip()
    if raw.get("revision_of_model"):
        base = f"{base}@{raw['revision_of_model']}"
    conv.set("base_model", base, "base_model")
    for key in ("base_model_config", "tokenizer_config"):
        if raw.get(key) and raw[key] != raw["base_model"]:
            conv.drop(key, f"loraforge reads config and tokenizer from base_model, not {raw[key]!r}", "base_model")
    if raw.get("rl") or raw.get("reward_model") or raw.get("process_reward_model"):
        key = next(k for k in ("rl", "reward_model", "process_reward_model") if raw.get(k))
        conv.problem(key, f"{raw[key]!r}: loraforge trains supervised LoRA adapters only (no preference or reward "
                     "training); convert an SFT config instead")  # fmt: skip


def _data(conv: _Converter) -> None:
    raw = conv.raw
    datasets = raw.get("datasets") or []
    pretraining = raw.get("pretraining_dataset") or []
    pretraining = [pretraining] if isinstance(pretraining, dict) else pretraining
    if not isinstance(datasets, list) or not isinstance(pretraining, list):
        conv.problem("datasets", "expected a list of datasets (- path: ..., type: ...)")
        return
    if not datasets and not pretraining:
        conv.problem("datasets", "no datasets (nor pretraining_dataset): loraforge needs data.train_file")
        return
    if datasets:
        _dataset(conv, "datasets[0]", datasets[0], "data.train_file")
        for index in range(1, len(datasets)):
            conv.drop(f"datasets[{index}]", "loraforge trains on one dataset (data.train_file); merge the files first")
        if pretraining:
            conv.drop("pretraining_dataset", "datasets is used; loraforge trains on one dataset")
    else:
        _dataset(conv, "pretraining_dataset[0]", pretraining[0], "data.train_file")
        conv.change("pretraining_dataset", "streamed by Axolotl; loraforge downloads the dataset's files")
    tests = raw.get("test_datasets") or []
    if tests:
        _dataset(conv, "test_datasets[0]", tests[0], "data.validation_file")
        conv.change("test_datasets", "Axolotl evaluates on it while training; loraforge uses it as the "
                    "validation split (eval_every loss, early stopping, merge and GGUF checks)",
                    "data.validation_file")  # fmt: skip
    _val_set_size(conv, bool(tests))
    if "seed" in raw and raw["seed"] is not None:
        seed = _coerce(conv, "seed", raw["seed"], int)
        conv.set("data.seed", seed, "seed")
        conv.set("train.seed", seed, "seed")
    strategy = raw.get("excess_length_strategy")
    if strategy in ("drop", "truncate"):
        conv.set("data.overlength", strategy, "excess_length_strategy")
    elif strategy is not None:
        conv.drop("excess_length_strategy", f"{strategy!r} is not drop or truncate", "data.overlength")
    if raw.get("chat_template") is not None and "data.chat_template" not in conv.origin:
        _chat_template(conv, "chat_template", raw["chat_template"])
    elif raw.get("chat_template") is not None and conv.origin["data.chat_template"] != "chat_template":
        conv.drop("chat_template", f"{raw['chat_template']!r}: not used for {conv.out['data']['format']} rows "
                  f"(set by {conv.origin['data.chat_template']})", "data.chat_template")  # fmt: skip


def _val_set_size(conv: _Converter, has_test_datasets: bool) -> None:
    size = conv.raw.get("val_set_size")
    if size is None or has_test_datasets:
        return
    size = _coerce(conv, "val_set_size", size, float)
    if size is None:
        return
    if size == 0:
        conv.change(
            "val_set_size",
            "0 = no evaluation in Axolotl; loraforge always carves out a validation "
            "split (merge and GGUF checks compare on it): its default is kept",
            "data.validation_fraction",
        )
    elif size >= 0.5 or size < 0:
        conv.problem("val_set_size", f"{size}: loraforge's data.validation_fraction must be in [0, 0.5)")
    else:
        conv.set("data.validation_fraction", size, "val_set_size")


def _dataset(conv: _Converter, key: str, spec: Any, target: str) -> None:
    if not isinstance(spec, dict) or not spec.get("path"):
        conv.problem(key, "a dataset needs a path (- path: org/name or a local file)")
        return
    conv.set(target, _data_source(conv, key, spec), f"{key}.path")
    kind = spec.get("type", "completion" if key.startswith("pretraining") else None)
    if kind == "pretrain":
        kind = "completion"
    fmt = DATASET_TYPES.get(kind) if isinstance(kind, str) else None
    if fmt is None:
        conv.problem(f"{key}.type", f"{kind!r}: loraforge has no such row format; it converts Axolotl types "
                     f"{', '.join(DATASET_TYPES)} (data.format: chat, prompt_completion, alpaca, classification, "
                     "text)")  # fmt: skip
        return
    if target != "data.train_file":
        if fmt != conv.out.get("data", {}).get("format"):
            conv.problem(f"{key}.type", f"{kind!r} differs from the training dataset's type; loraforge reads "
                         "every split in one data.format")  # fmt: skip
        return
    conv.set("data.format", fmt, f"{key}.type")
    if fmt == "text":
        conv.set("data.text_field", str(spec.get("field") or "text"), f"{key}.field")
    elif fmt == "alpaca":
        conv.set("data.chat_template", "alpaca", f"{key}.type")
        conv.change(f"{key}.type", "alpaca rows become user/assistant messages rendered with loraforge's alpaca "
                    "template (### Instruction / ### Response, without Axolotl's 'Below is an instruction' "
                    "preamble; the input joins the instruction)", "data.chat_template")  # fmt: skip
    else:
        _chat_dataset(conv, key, spec)
    for name, value in spec.items():
        if name not in DATASET_KEYS and value is not None:
            conv.drop(f"{key}.{name}", "no loraforge setting for this dataset option")


DATASET_KEYS = {"path", "type", "split", "revision", "ds_type", "field", "field_messages",
                "message_property_mappings", "message_field_role", "message_field_content", "roles",
                "roles_to_train", "chat_template", "name", "data_files"}  # fmt: skip


def _data_source(conv: _Converter, key: str, spec: dict[str, Any]) -> str:
    path = str(spec["path"])
    if spec.get("name"):
        conv.drop(f"{key}.name", f"dataset configuration {spec['name']!r}: loraforge reads a Hub dataset's files "
                  "by split; download the configuration and give its folder", "data.train_file")  # fmt: skip
    if spec.get("data_files"):
        conv.drop(f"{key}.data_files", "loraforge reads every data file of the split", "data.train_file")
    local = Path(path).expanduser()
    if local.exists() or path.startswith((".", "/", "~")) or local.suffix in DATA_SUFFIXES:
        if spec.get("split") not in (None, "train"):
            conv.drop(f"{key}.split", "a local file is read whole", "data.train_file: FOLDER#SPLIT")
        conv.change(f"{key}.path", "a local path: written absolute from the folder import-config ran in (Axolotl "
                    "reads it from its working directory; loraforge from the config's folder)")  # fmt: skip
        return str(local.resolve())
    revision = f"@{spec['revision']}" if spec.get("revision") else ""
    split = f"#{spec['split']}" if spec.get("split") not in (None, "train") else ""
    return f"hub:{path}{revision}{split}"


def _chat_dataset(conv: _Converter, key: str, spec: dict[str, Any]) -> None:
    wanted = "rows {'messages': [{'role', 'content'}]} with roles system/user/assistant"
    if spec.get("field_messages", "messages") != "messages":
        conv.drop(f"{key}.field_messages", f"{spec['field_messages']!r}: loraforge reads {wanted}; rename the "
                  "column in the data (the data stage stops on rows without 'messages')", "data.format")  # fmt: skip
    mapping = dict(spec.get("message_property_mappings") or {})
    for name in ("role", "content"):
        mapping.setdefault(name, spec.get(f"message_field_{name}") or name)
    if mapping != {"role": "role", "content": "content"}:
        conv.drop(f"{key}.message_property_mappings", f"{mapping}: loraforge reads {wanted}; rename the fields "
                  "in the data", "data.format")  # fmt: skip
    roles = spec.get("roles") or {}
    if not isinstance(roles, dict) or any(r not in ROLES or list(v or []) not in ([r], []) for r, v in roles.items()):
        conv.drop(f"{key}.roles", f"{roles}: loraforge accepts only the roles system, user, assistant as they are "
                  "in the rows; map them in the data", "data.format")  # fmt: skip
    trained = spec.get("roles_to_train")
    if trained is not None and list(trained) != ["assistant"]:
        conv.drop(f"{key}.roles_to_train", f"{trained}: loraforge learns the last assistant turn (or, with "
                  "data.train_on_prompt, every token)", "data.train_on_prompt")  # fmt: skip
    if spec.get("chat_template") is not None:
        _chat_template(conv, f"{key}.chat_template", spec["chat_template"])
    elif conv.raw.get("chat_template") is not None:
        _chat_template(conv, "chat_template", conv.raw["chat_template"])


def _chat_template(conv: _Converter, key: str, name: Any) -> None:
    if name in ("tokenizer_default", "chatml"):
        conv.set("data.chat_template", "auto" if name == "tokenizer_default" else "chatml", key)
        return
    if name == "tokenizer_default_fallback_chatml":
        conv.set("data.chat_template", "auto", key)
        conv.change(key, "no fallback in loraforge: a tokenizer without a template is an error", "data.chat_template")
        return
    conv.set("data.chat_template", "auto", key)
    conv.change(key, f"{name!r} is Axolotl's own template; loraforge uses the base tokenizer's template (auto), "
                "the same one for an instruct model that ships it; else name one of chatml, zephyr, alpaca",
                "data.chat_template")  # fmt: skip


def _adapter(conv: _Converter) -> None:
    raw = conv.raw
    adapter = raw.get("adapter")
    if adapter is None:
        conv.change("adapter", "none = a full fine-tune in Axolotl; loraforge trains a LoRA adapter (train.r ...)")
    elif adapter not in ("lora", "qlora"):
        conv.problem("adapter", f"{adapter!r}: loraforge trains lora or qlora adapters only")
    bits = [b for b, k in (("4bit", "load_in_4bit"), ("8bit", "load_in_8bit")) if raw.get(k)]
    if len(bits) > 1:
        conv.problem("load_in_8bit", "load_in_4bit and load_in_8bit are both true; keep one")
    elif bits:
        conv.set("train.quantization", bits[0], f"load_in_{bits[0]}")
    elif adapter == "qlora":
        conv.set("train.quantization", "4bit", "adapter")
    if adapter in ("lora", "qlora") and conv.origin.get("train.quantization") != "adapter":
        conv.result.as_is.append("adapter")  # loraforge trains a LoRA adapter; load_in_4bit carried the 4 bits
    if adapter == "qlora" and bits == ["8bit"]:
        conv.problem("adapter", "qlora loads the base in 4-bit, but load_in_8bit is true")
    for name, value in (raw.get("bnb_config_kwargs") or {}).items():
        target = {"bnb_4bit_quant_type": "train.quant_type", "bnb_4bit_use_double_quant": "train.double_quant"}
        if name in target:
            conv.set(target[name], value, f"bnb_config_kwargs.{name}")
        else:
            conv.drop(f"bnb_config_kwargs.{name}", "no loraforge setting", "train.quant_type, train.double_quant")
    modules = raw.get("lora_target_modules")
    if raw.get("lora_target_linear"):
        conv.set("train.target_modules", LINEAR, "lora_target_linear")
        if modules:
            conv.change("lora_target_modules", f"lora_target_linear already covers every linear layer ({LINEAR})")
    elif modules:
        modules = [modules] if isinstance(modules, str) else list(modules)
        conv.set("train.target_modules", [str(m) for m in modules], "lora_target_modules")
        if any(set(str(m)) & set("*.^$[]()|\\") for m in modules):
            conv.change("lora_target_modules", "a regular expression in Axolotl; loraforge matches names exactly")


def _precision(conv: _Converter) -> None:
    raw = conv.raw
    bf16, fp16 = raw.get("bf16"), raw.get("fp16")
    if bf16 is True and fp16 is True:
        conv.problem("fp16", "bf16 and fp16 are both true; keep one")
    elif bf16 == "auto":
        conv.set("train.precision", "auto", "bf16")
        conv.change("bf16", "auto: bf16 where the GPU supports it; loraforge's auto also picks fp16 on a GPU "
                    "without bf16 and fp32 on CPU", "train.precision")  # fmt: skip
    elif bf16 is True or fp16 is True:
        conv.set("train.precision", "bf16" if bf16 is True else "fp16", "bf16" if bf16 is True else "fp16")
    elif bf16 is False and not fp16:
        conv.set("train.precision", "fp32", "bf16")
    elif bf16 not in (None, False):
        conv.problem("bf16", f"{bf16!r}: expected true, false or auto")
    checkpointing = raw.get("gradient_checkpointing")
    if checkpointing is not None:
        conv.set("train.gradient_checkpointing", bool(checkpointing), "gradient_checkpointing")
        if not isinstance(checkpointing, bool):
            conv.change("gradient_checkpointing", f"{checkpointing!r}: loraforge recomputes on the GPU (no CPU "
                        "offload)")  # fmt: skip


def _schedule(conv: _Converter) -> None:
    raw = conv.raw
    for key, (target, kind) in SAME.items():
        if raw.get(key) is not None:
            conv.set(target, _coerce(conv, key, raw[key], kind), key)
    optimizer = raw.get("optimizer")
    if optimizer in OPTIMIZERS:
        conv.set("train.optimizer", OPTIMIZERS[optimizer], "optimizer")
    elif optimizer is not None:
        conv.drop("optimizer", f"{optimizer!r}: loraforge trains with AdamW (fp32, 8-bit or paged states)",
                  "train.optimizer")  # fmt: skip
    scheduler = raw.get("lr_scheduler")
    if scheduler in SCHEDULERS:
        conv.set("train.scheduler", SCHEDULERS[scheduler], "lr_scheduler")
    elif scheduler is not None:
        conv.drop("lr_scheduler", f"{scheduler!r}: loraforge decays with cosine, linear or constant",
                  "train.scheduler")  # fmt: skip
    warmup = raw.get("warmup_steps")
    if warmup is not None and raw.get("warmup_ratio") is not None:
        conv.drop("warmup_steps", "warmup_ratio is given too and is used", "train.warmup_ratio")
    elif warmup is not None and raw.get("max_steps"):
        steps, total = _coerce(conv, "warmup_steps", warmup, int), _coerce(conv, "max_steps", raw["max_steps"], int)
        if steps is None or not total:
            return
        ratio = steps / total
        conv.set("train.warmup_ratio", round(ratio, 6), "warmup_steps")
        conv.change("warmup_steps", f"{warmup} of max_steps {raw['max_steps']} steps = warmup_ratio {ratio:.4g}")
    elif warmup is not None:
        conv.drop("warmup_steps", "loraforge warms up over a share of the steps, whose number depends on the "
                  "data; set the share", "train.warmup_ratio")  # fmt: skip
    for key in ("eval_steps", "save_steps"):
        value = raw.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            conv.set(f"train.{key.removesuffix('_steps')}_every", value, key)


def _publish(conv: _Converter) -> None:
    repo = conv.raw.get("hub_model_id")
    if repo:
        conv.set("publish.repo_id", str(repo), "hub_model_id")
        conv.set("publish.push", "auto", "hub_model_id")
    else:
        conv.set("publish.push", "never", "(no hub_model_id)")
        conv.result.defaults.append("publish.push: never (no hub_model_id: Axolotl does not push either)")
    output = conv.raw.get("output_dir")
    if output:
        conv.set("store", str(output), "output_dir")
        conv.change("output_dir", "the artifact store: every stage writes <store>/<stage>/<key>/ (the adapter in "
                    "<store>/train/<key>/)", "store")  # fmt: skip


# Top-level keys the functions above read; every other key goes through `_other`.
HANDLED = {"base_model", "revision_of_model", "base_model_config", "tokenizer_config", "rl", "reward_model",
           "process_reward_model", "datasets", "pretraining_dataset", "test_datasets", "val_set_size", "seed",
           "excess_length_strategy", "chat_template", "adapter", "load_in_4bit", "load_in_8bit",
           "bnb_config_kwargs", "lora_target_modules", "lora_target_linear", "bf16", "fp16",
           "gradient_checkpointing", "optimizer", "lr_scheduler", "warmup_steps", "hub_model_id", "output_dir",
           *SAME}  # fmt: skip


def _other(conv: _Converter, key: str, value: Any) -> None:
    if key in ("eval_steps", "save_steps") and isinstance(value, int) and not isinstance(value, bool):
        return  # carried over by _schedule
    if value is None or value == "" or value == [] or value == {}:
        conv.result.empty.append(key)
        return
    if not isinstance(value, (dict, list)) and (key, value) in SAME_AS_LORAFORGE:
        conv.result.as_is.append(key)
        return
    found = NOT_CARRIED.get(key) or next((v for k, v in NOT_CARRIED.items() if k.endswith("_") and
                                          key.startswith(k)), None)  # fmt: skip
    reason, closest = found or ("no loraforge setting for this Axolotl key", None)
    shown = json.dumps(value, default=str)  # as YAML shows it: true, "flash_attention_2", ["a", "b"]
    shown = shown if len(shown) <= 60 else f"(a {'mapping' if isinstance(value, dict) else 'list'})"
    conv.drop(key, f"{shown}: {reason}", closest)


def _eval_defaults(conv: _Converter) -> None:
    """Axolotl has no test-set gate; loraforge's default gate is for classification answers (accuracy)."""
    if conv.out.get("data", {}).get("format") == "text":
        metrics, gate = ["perplexity"], ["perplexity_delta <= 0"]
    else:
        metrics, gate = ["rouge_l", "perplexity"], ["loss_delta <= 0"]
    conv.set("eval.metrics", metrics, "(no Axolotl equivalent)")
    conv.set("eval.gate", gate, "(no Axolotl equivalent)")
    conv.result.defaults.append(f"eval.metrics {metrics} and eval.gate {gate}: the tuned adapter must not be worse "
                                "than the base on the test split (Axolotl has no gate; loraforge's default gate "
                                "checks classification accuracy)")  # fmt: skip
    conv.result.defaults.append("data.test_fraction 0.1 (default): loraforge holds out a test split for the eval "
                                "stage; Axolotl has none")  # fmt: skip


def _coerce(conv: _Converter, key: str, value: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind is int:
            number = float(value)
            if number != int(number) or isinstance(value, bool):
                raise ValueError
            return int(number)
        if kind is list:
            return [str(v) for v in ([value] if isinstance(value, str) else value)]
        return kind(value)
    except (TypeError, ValueError):
        conv.problem(key, f"{value!r}: expected {kind.__name__}")
        return None


def _check(conv: _Converter) -> None:
    """Every problem at once: what cannot be converted, then what loraforge's config model rejects."""
    from pydantic import ValidationError

    from loraforge.tasks.config import PipelineConfig

    problems = list(conv.problems)
    if not problems:
        try:
            PipelineConfig.model_validate(conv.out)
        except ValidationError as exc:
            for error in exc.errors():
                loc = ".".join(str(p) for p in error["loc"])
                origin = next((conv.origin[k] for k in conv.origin if loc == k or loc.startswith(k + ".")), loc)
                problems.append(f"{conv.where(origin)}: {origin} -> {loc}: {error['msg']} "
                                f"(given: {error.get('input')!r})")  # fmt: skip
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        raise ConfigError(f"cannot import {conv.source} ({count}):\n  - " + "\n  - ".join(problems))
