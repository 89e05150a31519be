"""The minimal training loop of the vertical slice: stages in order, each with its tune modes,
AdamW with per-component learning rates, a warm-up schedule, gradient accumulation and clipping;
metrics to JSONL; a safetensors checkpoint and the resolved recipe at each stage's end.
(The full engine, with accelerate, resume and export, replaces this loop.)"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader
from tqdm.auto import tqdm

from vlmkit.core.checkpoint import save_checkpoint, trainable_state_dict
from vlmkit.core.compose import IMAGE_TOKEN, VisionLanguageModel, build_model
from vlmkit.core.data.collate import Collator
from vlmkit.core.errors import VlmkitError
from vlmkit.core.recipe.loader import ResolvedRecipe
from vlmkit.core.recipe.schema import StageSpec
from vlmkit.core.tuning import apply_tuning, embedding_tables

_NO_DECAY_HINTS = ("norm", "bias", "gate", "embed")


@dataclass
class StageResult:
    name: str
    steps: int
    losses: list[float] = field(default_factory=list)
    checkpoint: Path | None = None


@dataclass
class RunResult:
    output_dir: Path
    stages: list[StageResult]
    model: VisionLanguageModel


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def param_groups(model: VisionLanguageModel, stage: StageSpec) -> list[dict[str, Any]]:
    """One group per (component, decay?) with the component's learning rate; no weight decay on
    norms, biases, gates, embeddings or any 1-d parameter."""
    groups = []
    tables = {id(t) for t in embedding_tables(model.decoder)}
    for comp in model.component_names:
        lr = stage.lr_per_component.get(comp, stage.lr)
        decay, no_decay = [], []
        for name, param in getattr(model, comp).named_parameters():
            if not param.requires_grad:
                continue
            if param.ndim < 2 or id(param) in tables or any(h in name.lower() for h in _NO_DECAY_HINTS):
                no_decay.append(param)
            else:
                decay.append(param)
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": stage.optimizer.weight_decay, "name": f"{comp}"})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{comp}.no_decay"})
    return groups


def run(resolved: ResolvedRecipe, output_dir: Path, registry: Any = None, progress: bool = True) -> RunResult:
    if registry is None:
        from vlmkit.core.registry import get_registry

        registry = get_registry()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "recipe.yaml").write_text(resolved.to_yaml(), encoding="utf-8")
    model = build_model(resolved, registry)
    device = _device()
    model.to(device)
    datasets = {
        alias: registry.component_class("dataset", spec.name)(spec.config) for alias, spec in resolved.datasets.items()
    }
    collator = Collator(
        tokenizer=model.decoder.tokenizer,
        preprocess=model.encoder.preprocess,
        image_token=IMAGE_TOKEN,
        placeholder_tokens=model.placeholder_tokens(),
    )
    metrics_path = output_dir / "metrics.jsonl"
    results = []
    with metrics_path.open("a", encoding="utf-8") as metrics:
        for index, stage in enumerate(resolved.recipe.stages):
            results.append(
                _run_stage(model, stage, index, resolved, datasets, collator, output_dir, metrics, device, progress)
            )
    return RunResult(output_dir, results, model)


def _run_stage(
    model: VisionLanguageModel,
    stage: StageSpec,
    index: int,
    resolved: ResolvedRecipe,
    datasets: dict[str, Any],
    collator: Collator,
    output_dir: Path,
    metrics: Any,
    device: torch.device,
    progress: bool,
) -> StageResult:
    label = f"stages.{index}"
    report = apply_tuning(model, stage.tune, label)
    _print_report(stage.name, report, progress)
    groups = param_groups(model, stage)
    if not groups:
        raise VlmkitError(f"{label}.tune: stage '{stage.name}' trains no parameters; set some component to full, lora or partial")
    optimizer = torch.optim.AdamW(groups, betas=stage.optimizer.betas, eps=stage.optimizer.eps)
    data = ConcatDataset([datasets[a] for a in stage.data])
    generator = torch.Generator().manual_seed(resolved.recipe.seed + index)
    loader = DataLoader(data, batch_size=stage.batch_size, shuffle=True, collate_fn=collator, generator=generator, drop_last=False)
    steps_per_epoch = math.ceil(len(loader) / stage.grad_accum)
    total = stage.max_steps or max(1, math.ceil(stage.epochs * steps_per_epoch))
    warmup = stage.warmup_steps or int(stage.warmup_ratio * total)
    from transformers import get_scheduler

    scheduler = get_scheduler(stage.schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(stage.precision)
    model.train()
    for comp, counts in report.items():  # frozen parts keep their BatchNorm statistics, no dropout
        if comp in model.component_names and counts["trainable"] == 0:
            getattr(model, comp).eval()
    result = StageResult(stage.name, 0)
    bar = tqdm(total=total, desc=f"stage {stage.name}", disable=not progress, dynamic_ncols=True)
    batches = _cycle(loader)
    step = 0
    while step < total:
        t0 = time.perf_counter()
        loss_sum, n_samples = 0.0, 0
        for _ in range(stage.grad_accum):
            batch = next(batches)
            tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model(**tensors)
            loss = out.loss
            if not torch.isfinite(loss):
                raise VlmkitError(
                    f"stage '{stage.name}' step {step + 1}: the loss is {loss.item()} for the batch of samples "
                    f"{', '.join(batch['ids'])}; lower the learning rate or check these samples"
                )
            (loss / stage.grad_accum).backward()
            loss_sum += loss.item() / stage.grad_accum
            n_samples += len(batch["ids"])
        if stage.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], stage.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - t0
        lr = scheduler.get_last_lr()[0]
        result.losses.append(loss_sum)
        if step % stage.log_every == 0 or step == total:
            record = {"stage": stage.name, "step": step, "loss": loss_sum, "lr": lr, "samples_per_s": n_samples / elapsed}
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", sps=f"{n_samples / elapsed:.1f}")
        bar.update(1)
    bar.close()
    result.steps = step
    result.checkpoint = save_checkpoint(
        output_dir / f"stage-{index}-{stage.name}",
        trainable_state_dict(model),
        resolved.to_yaml(),
        {"stage": stage.name, "stage_index": index, "step": step, "final_loss": result.losses[-1]},
    )
    return result


def _cycle(loader: DataLoader):
    while True:
        yield from loader


def _print_report(stage: str, report: dict[str, dict[str, int]], enabled: bool) -> None:
    if not enabled:
        return
    lines = [f"stage {stage}: parameters per component", f"  {'component':<10} {'trainable':>12} {'frozen':>12}"]
    for comp, counts in report.items():
        lines.append(f"  {comp:<10} {counts['trainable']:>12,} {counts['frozen']:>12,}")
    tqdm.write("\n".join(lines))
