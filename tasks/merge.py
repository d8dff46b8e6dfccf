"""Merge stage: fold the LoRA adapter into the base weights in fp32, check fidelity, save in the target dtype.

Policy (recorded in the manifest): the merge is done in float32 and only then cast to `merge.dtype`; merging
directly in bf16 loses far more (max logit error ~3 vs ~1e-4 in fp32). For a LoRA adapter the merge is onto the
original base weights. For a QLoRA adapter `merge.qlora_base` chooses: `dequantized` (default) merges onto
dequant(quant(W)), the weights the adapter saw in training and eval, so the merged model behaves like the
evaluated one; `original` merges onto the 16/32-bit weights, dropping the quantization error the adapter may
have learned to compensate. The merged model is compared with the unmerged adapter model on the same base
weights on probe rows of the validation split; for QLoRA, and for an adapter trained on a bf16/fp16 base
(`train.precision`), the agreement with the model as trained (the bitsandbytes or 16-bit base + adapter, under
the training autocast) is measured and recorded too.
Run alone: `loraforge stage merge CONFIG [key=value ...]`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from loraforge.tasks.artifacts import Artifact, ArtifactStore
from loraforge.tasks.batching import collate, read_split
from loraforge.tasks.errors import StageError


class MergeConfig(BaseModel):
    """How to merge and how close the merged model must stay to the adapter model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of the saved merged weights (the merge itself is always fp32). auto: the dtype the base "
        "model's config.json declares (torch_dtype; bfloat16 for Gemma, Llama 3, Qwen), float32 when it declares "
        "none. float16 overflows on some models trained in bfloat16 (Gemma 3); a failed check measures the other "
        "dtypes and names those that pass.",
    )
    probe_rows: int = Field(16, ge=1, description="Validation rows used to compare adapter and merged logits.")
    probe_batch_size: int = Field(
        4,
        ge=1,
        description="Probe rows run through a model at once. The check holds a few copies of one such micro-batch's "
        "logits (rows x tokens x vocabulary x 4 B) whatever probe_rows is, and keeps the adapter model's logits "
        "for all probe rows on disk in the store's .tmp folder until it is done; lower it for a large vocabulary.",
    )
    max_abs_logit_diff: float = Field(
        1e-3, gt=0, description="Largest allowed |adapter - merged(fp32)| logit difference on the probe rows."
    )
    min_top1_agreement: float = Field(
        0.95, ge=0, le=1, description="Least share of probe tokens whose argmax the cast merged model keeps."
    )
    qlora_base: Literal["dequantized", "original"] = Field(
        "dequantized",
        description="QLoRA adapters only: merge onto dequant(quant(W)) (what training saw) or the original weights.",
    )
    max_mean_kl: float = Field(
        0.01, gt=0, description="Largest mean KL(adapter || cast merged) of next-token distributions (nats/token)."
    )


class MergedModel(NamedTuple):
    """What the merge artifact tells the other stages (read it with `read_merge`)."""

    dtype: str  # the merged weights' dtype
    policy: str | None  # how it was merged (onto which weights, then cast)
    made_from: dict[str, str]  # stage -> key of the artifacts it was merged from (base, data, train)


def read_merge(merge: Artifact) -> MergedModel:
    """The merge artifact's dtype (as resolved, when the config said auto), policy and inputs."""
    m = merge.manifest
    made_from = {stage: str(info["key"]) for stage, info in m["inputs"].items()}
    return MergedModel(str(m.get("dtype", m["config"]["dtype"])), m.get("merge_policy"), made_from)


def resolve_dtype(wanted: str, model_path: Path) -> str:
    """`merge.dtype` as a real dtype: itself, or for auto the dtype the base's config.json declares (`dtype`, or
    `torch_dtype` as written before transformers 5), float32 when it declares none or another one."""
    if wanted != "auto":
        return wanted
    declared = json.loads((model_path / "config.json").read_text())
    name = str(declared.get("dtype") or declared.get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def merge_adapter(
    config: MergeConfig, base: Artifact, data: Artifact, train: Artifact, store: ArtifactStore
) -> Artifact:
    """Merge the adapter into the base model and save an HF folder; skipped when cached.

    Returns:
        The merge artifact: `model/` (config, safetensors, tokenizer) and `fidelity.json`.

    Raises:
        StageError: NaN/inf weights, or fidelity outside the configured limits (nothing is written then).
    """
    inputs = {"base": base, "data": data, "train": train}
    key, code = store.stage_key("merge", __file__, config, inputs)
    with store.claim("merge", key) as hit:
        return hit or _build_merge(config, base, data, train, store, key, code)


def keep_tokenizer_files(base_dir: Path, model_dir: Path) -> None:
    """What the base's tokenizer declares beyond what transformers re-saves: its SentencePiece model
    (`tokenizer.model`: Llama 2, Mistral v0.x and Phi-3 ship one, and llama.cpp's converter reads it) and its
    `tokenizer_class` (save_pretrained writes the class that loaded it, and llama.cpp's Phi-3 converter picks
    the GPT-2 vocabulary path, as for Phi-4, by that name)."""
    spm = base_dir / "tokenizer.model"
    if spm.is_file() and not (model_dir / "tokenizer.model").is_file():
        shutil.copy2(spm, model_dir / "tokenizer.model")
    base_config, saved_config = base_dir / "tokenizer_config.json", model_dir / "tokenizer_config.json"
    if base_config.is_file() and saved_config.is_file():
        declared = json.loads(base_config.read_text()).get("tokenizer_class")
        saved = json.loads(saved_config.read_text())
        if declared and saved.get("tokenizer_class") != declared:
            saved_config.write_text(json.dumps({**saved, "tokenizer_class": declared}, indent=2, ensure_ascii=False))


def _build_merge(
    config: MergeConfig, base: Artifact, data: Artifact, train: Artifact, store: ArtifactStore, key: str, code: str
) -> Artifact:
    """Merge, check and save the merge artifact `key` (its lock is held)."""
    inputs = {"base": base, "data": data, "train": train}
    started = time.time()

    from loraforge.tasks.models import load_tokenizer, read_base
    from loraforge.tasks.train import read_train

    model_path = read_base(base).model_path
    tokenizer = load_tokenizer(model_path)
    # The merged model (and the GGUF made from it) prompts as training did: the data artifact's template.
    tokenizer.chat_template = data.file("chat_template.jinja").read_text() or tokenizer.chat_template
    probes = read_split(data.file("validation.jsonl"))[: config.probe_rows]
    trained = read_train(train).settings
    qlora = trained.get("quantization", "none") != "none"
    onto = "the original base weights"
    if qlora and config.qlora_base == "dequantized":
        onto = f"dequant(quant(W)) with the train stage's {trained['quantization']} settings"
    dtype = resolve_dtype(config.dtype, model_path)
    declared = " (merge.dtype=auto: the base config's dtype)" if config.dtype == "auto" else ""
    policy = f"fp32 merge onto {onto}, then cast to {dtype}{declared}"
    dequantized = qlora and config.qlora_base == "dequantized"
    model = _adapter_model(model_path, train, dequantized)
    compare = qlora or trained["precision"] != "fp32"  # the adapter was trained on other weights than fp32
    as_trained = (lambda: _as_trained_model(model_path, train)) if compare else None
    with store.scratch("merge", key) as scratch:
        merged, fidelity = measure_fidelity(
            model, probes, tokenizer.pad_token_id, dtype, config.probe_batch_size, scratch, as_trained
        )
        problems = judge_fidelity(fidelity, config, dtype)
        if problems:
            del merged, model  # the other dtypes are measured on a fresh merge
            others = measure_other_dtypes(
                lambda: _adapter_model(model_path, train, dequantized), probes, tokenizer.pad_token_id,
                config.probe_batch_size, scratch, dtype, fidelity,
            )  # fmt: skip
            raise StageError("merge fidelity check failed: " + "; ".join(problems + [advice(others, config)]))
    print(
        f"[merge] fp32 max |Δlogit| {fidelity['fp32_max_abs_logit_diff']:.2e}, "
        f"{dtype} top-1 agreement {fidelity['cast_top1_agreement']:.3f}, mean KL {fidelity['cast_mean_kl']:.2e}"
    )

    with store.create("merge", key, config, inputs, code, started=started) as draft:
        merged.config.name_or_path = ""  # no machine path in the saved config
        merged.save_pretrained(draft.path / "model", safe_serialization=True)
        tokenizer.save_pretrained(draft.path / "model")
        keep_tokenizer_files(model_path, draft.path / "model")
        (draft.path / "fidelity.json").write_text(json.dumps(fidelity, indent=2))
        draft.metrics.update(fidelity)
        draft.extra["merge_policy"] = policy
        draft.extra["dtype"] = dtype
    return store.get("merge", key, fresh=True)


def judge_fidelity(fidelity: dict[str, Any], config: MergeConfig, dtype: str) -> list[str]:
    """The merge's verdict on figures `measure_fidelity` measured for the merged model cast to `dtype`: one line
    per limit they break, none if they pass. Pure: a new limit re-judges the same figures."""
    problems = []
    if fidelity["fp32_max_abs_logit_diff"] > config.max_abs_logit_diff:
        problems.append(
            f"fp32 max |Δlogit| {fidelity['fp32_max_abs_logit_diff']:.2e} "
            f"> merge.max_abs_logit_diff={config.max_abs_logit_diff}"
        )
    if fidelity["cast_top1_agreement"] < config.min_top1_agreement:
        problems.append(
            f"{dtype} top-1 agreement {fidelity['cast_top1_agreement']:.3f} "
            f"< merge.min_top1_agreement={config.min_top1_agreement}"
        )
    if fidelity["cast_mean_kl"] > config.max_mean_kl:
        problems.append(f"{dtype} mean KL {fidelity['cast_mean_kl']:.2e} > merge.max_mean_kl={config.max_mean_kl}")
    return problems


def advice(others: dict[str, dict[str, Any]], config: MergeConfig) -> str:
    """What the failed merge check tells the user to do, from the other dtypes' figures (`measure_other_dtypes`):
    each one's top-1 agreement and mean KL, whether it passes the same limits, and the setting to use."""
    figures = [
        f"{name}: top-1 {f['cast_top1_agreement']:.3f}, mean KL {f['cast_mean_kl']:.2e}"
        f" ({'passes' if not judge_fidelity(f, config, name) else 'fails too'})"
        for name, f in others.items()
    ]
    passing = [name for name, f in others.items() if not judge_fidelity(f, config, name)]
    fix = (
        f"set merge.dtype={passing[0]}"
        if passing
        else "no dtype passes: the adapter itself is off (retrain), or "
        "relax merge.min_top1_agreement / merge.max_mean_kl"
    )
    return f"measured on the same probe rows: {', '.join(figures) or 'no other dtype'}; {fix}"


@dataclass
class Closeness:
    """How one model's next-token logits follow a reference model's, summed over micro-batches of probe
    positions so that the figures over all probe rows never need all their logits at once."""

    max_abs_diff: float = 0.0
    same_top1: int = 0
    positions: int = 0
    same_top1_answer: int = 0
    answer_positions: int = 0
    kl_sum: float = 0.0

    def add(self, reference: Any, other: Any, answer: Any) -> None:
        """Count one micro-batch: `reference` and `other` are [positions, vocabulary] logits at the same probe
        positions, `answer` [positions] marks those whose next token is labelled (the task's answer)."""
        import torch

        self.max_abs_diff = max(self.max_abs_diff, float((reference - other).abs().max()))
        same = reference.argmax(-1) == other.argmax(-1)
        self.same_top1 += int(same.sum())
        self.positions += len(same)
        self.same_top1_answer += int(same[answer].sum())
        self.answer_positions += int(answer.sum())
        # KL(softmax(reference) || softmax(other)) per position; in place: two [positions, vocabulary] temporaries
        log_p, log_q = torch.log_softmax(reference.float(), -1), torch.log_softmax(other.float(), -1)
        log_q.neg_().add_(log_p)  # log_p - log_q (exactly: negation is exact, addition commutes)
        self.kl_sum += float(log_p.exp_().mul_(log_q).sum(-1).double().sum())

    def top1_agreement(self, answer_only: bool = False) -> float:
        """Share of the positions (or of the answer positions) whose argmax the two models share."""
        same, total = (
            (self.same_top1_answer, self.answer_positions) if answer_only else (self.same_top1, self.positions)
        )
        return same / total if total else float("nan")

    def mean_kl(self) -> float:
        """Mean KL over the positions, >= 0 (identical models give float noise around 0, clamped)."""
        return max(self.kl_sum / max(self.positions, 1), 0.0)


def measure_fidelity(
    model: Any,
    probes: list[dict[str, Any]],
    pad_id: int,
    dtype: str,
    batch_size: int,
    scratch: Path,
    as_trained: Callable[[], tuple[Any, str]] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Merge a PeftModel in fp32, cast it to `dtype`, and measure how closely each follows the adapter model on
    the probe rows (every non-padding position), `batch_size` rows at a time.

    The weights exist once (the merge and the cast happen in place), so the adapter model's logits are computed
    first and wait in `scratch`, one file per micro-batch; each later pass reads them back one micro-batch at a
    time. Peak memory: the weights and a few copies of one micro-batch's logits, whatever the number of rows.

    Args:
        model: the base model with the adapter (a PeftModel), eval mode.
        probes: data-artifact rows (input_ids, labels).
        pad_id: the tokenizer's padding id.
        dtype: the dtype the merged model is saved in.
        batch_size: probe rows per micro-batch (merge.probe_batch_size).
        scratch: an empty folder for the adapter model's logits (rows x tokens x vocabulary x 4 B in all).
        as_trained: QLoRA or a bf16/fp16-trained adapter: loads the model as trained (quantized or 16-bit base +
            adapter) and says its precision, to measure the cast model against it too (run under the training
            autocast); it is loaded after the adapter pass and freed before the merge.

    Returns:
        The merged model (cast to `dtype`) and the figures recorded in fidelity.json.

    Raises:
        StageError: the merged weights hold NaN/inf (a corrupt adapter).
    """
    import torch

    batches = _probe_batches(probes, pad_id, batch_size)
    references = {"adapter": scratch / "adapter"}
    with torch.no_grad():
        _write_logits(model, batches, references["adapter"])
        if as_trained is not None:
            references["trained"] = scratch / "trained"
            trained_model, precision = as_trained()
            _write_logits(trained_model, batches, references["trained"], precision)
            del trained_model  # freed before the merge
        merged = model.merge_and_unload()
        bad = [name for name, p in merged.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise StageError(
                f"merged weights contain NaN/inf in {len(bad)} tensors (first: {bad[0]}); the adapter is corrupt."
            )
        fp32 = _follow(merged, batches, {"adapter": references["adapter"]})["adapter"]
        merged = merged.to(getattr(torch, dtype))
        cast = _follow(merged, batches, references)
    fidelity = {
        "fp32_max_abs_logit_diff": fp32.max_abs_diff,
        "cast_max_abs_logit_diff": cast["adapter"].max_abs_diff,
        "cast_top1_agreement": cast["adapter"].top1_agreement(),
        "cast_top1_agreement_answer": cast["adapter"].top1_agreement(answer_only=True),
        "cast_mean_kl": cast["adapter"].mean_kl(),
        "probe_tokens": cast["adapter"].positions,
    }
    if "trained" in cast:  # how far the saved model is from the model that was trained and evaluated
        fidelity["vs_trained_top1_agreement"] = cast["trained"].top1_agreement()
        fidelity["vs_trained_mean_kl"] = cast["trained"].mean_kl()
    return merged, fidelity


def measure_other_dtypes(
    adapter_model: Callable[[], Any],
    probes: list[dict[str, Any]],
    pad_id: int,
    batch_size: int,
    scratch: Path,
    failed: str,
    figures: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """After the merged model cast to `failed` missed a limit: the same figures for the other dtypes, 16-bit
    first (the smaller file), then float32, each on a fresh fp32 merge of `adapter_model()` (its weights exist
    once at a time) against the adapter model's logits `measure_fidelity` left in `scratch/adapter`."""
    import torch

    batches = _probe_batches(probes, pad_id, batch_size)
    others: dict[str, dict[str, Any]] = {}
    for dtype in [d for d in ("bfloat16", "float16", "float32") if d != failed]:
        with torch.no_grad():
            merged = adapter_model().merge_and_unload().to(getattr(torch, dtype))
            cast = _follow(merged, batches, {"adapter": scratch / "adapter"})["adapter"]
        del merged
        others[dtype] = {
            **figures,
            "cast_max_abs_logit_diff": cast.max_abs_diff,
            "cast_top1_agreement": cast.top1_agreement(),
            "cast_mean_kl": cast.mean_kl(),
        }
    return others


def _probe_batches(probes: list[dict[str, Any]], pad_id: int, batch_size: int) -> list[tuple[Any, Any, Any]]:
    """Micro-batches of `batch_size` probe rows: ids, attention mask, and which of the non-padding positions
    predict a labelled (answer) token. Every micro-batch is padded to the longest probe row, as the rows were
    when they ran as one batch: a row's logits then do not depend on how the rows are grouped (in bf16 they
    would change with the padded width)."""
    import torch

    ids, labels, mask = collate(probes, pad_id)
    # Positions whose next token is a labelled (completion) token: where the task's answer is decided.
    answer = torch.zeros_like(mask)
    answer[:, :-1] = (labels[:, 1:] != -100).long()
    rows = [slice(start, start + batch_size) for start in range(0, len(probes), batch_size)]
    return [(ids[r], mask[r], answer[r][mask[r].bool()].bool()) for r in rows]


def _logits(model: Any, ids: Any, mask: Any, precision: str = "fp32") -> Any:
    """fp32 logits at the non-padding positions, [positions, vocabulary], on the CPU (the forward under the
    autocast of a bf16/fp16 training precision)."""
    from loraforge.tasks.batching import model_device
    from loraforge.tasks.models import autocast

    device = model_device(model)  # bitsandbytes places a QLoRA base on CUDA when there is one
    with autocast(precision, str(device)):
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    return logits[mask.to(device).bool()].float().cpu()


def _write_logits(model: Any, batches: list[tuple[Any, Any, Any]], folder: Path, precision: str = "fp32") -> None:
    """One file of logits per micro-batch, for `_follow` to read back."""
    import torch

    model.eval()
    folder.mkdir()
    for index, (ids, mask, _) in enumerate(batches):
        torch.save(_logits(model, ids, mask, precision), folder / f"{index}.pt")


def _follow(model: Any, batches: list[tuple[Any, Any, Any]], references: dict[str, Path]) -> dict[str, Closeness]:
    """How `model` follows each reference model whose logits `_write_logits` wrote, one micro-batch at a time."""
    import torch

    tallies = {name: Closeness() for name in references}
    for index, (ids, mask, answer) in enumerate(batches):
        logits = _logits(model, ids, mask)
        for name, folder in references.items():
            reference = torch.load(folder / f"{index}.pt", weights_only=True)
            tallies[name].add(reference, logits, answer)
            del reference
    return tallies


def _adapter_model(model_path: Path, train: Artifact, dequantized: bool) -> Any:
    """The fp32 base (dequant(quant(W)) for a QLoRA adapter merged onto what it saw) with the adapter, eval mode."""
    from loraforge.tasks.models import import_peft, load_causal_lm
    from loraforge.tasks.train import read_train

    PeftModel = import_peft().PeftModel

    base_model = load_causal_lm(model_path, "float32")
    if dequantized:
        quantization_roundtrip(base_model, read_train(train).settings)
    model = PeftModel.from_pretrained(base_model, train.file("adapter"))
    model.eval()
    return model


def quantization_roundtrip(model: Any, trained: dict[str, Any]) -> None:
    """Replace, in place, every linear weight bitsandbytes quantizes when loading for QLoRA (all nn.Linear but the
    output head) by dequant(quant(W)) with the train stage's settings: the weights the adapter was trained on."""
    import bitsandbytes.functional as bnbf
    import torch

    head = model.get_output_embeddings()
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, torch.nn.Linear) or module is head:
                continue
            weight = module.weight.data
            if trained["quantization"] == "4bit":
                packed, state = bnbf.quantize_4bit(
                    weight, blocksize=64, compress_statistics=trained.get("double_quant", True),
                    quant_type=trained.get("quant_type", "nf4"),
                )  # fmt: skip
                module.weight.data = bnbf.dequantize_4bit(packed, state).to(weight.dtype)
            else:
                codes, scales, _ = bnbf.int8_vectorwise_quant(weight.half())
                module.weight.data = (codes.float() * scales.float()[:, None] / 127).to(weight.dtype)


def _as_trained_model(model_path: Path, train: Artifact) -> tuple[Any, str]:
    """The model as trained and evaluated (the bitsandbytes-quantized or bf16/fp16 base with the adapter) and the
    training precision its forward runs under."""
    from loraforge.tasks.models import import_peft, load_base_as_trained
    from loraforge.tasks.train import read_train

    PeftModel = import_peft().PeftModel

    settings = read_train(train).settings
    model = PeftModel.from_pretrained(load_base_as_trained(model_path, settings), train.file("adapter"))
    model.eval()
    return model, settings["precision"]
