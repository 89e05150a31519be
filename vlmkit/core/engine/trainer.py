"""The engine: one trainer for every recipe, from one CPU core to many GPUs through accelerate.

Stages run in the recipe's order on one model, so each starts from the weights the previous one
left. Per step: ``grad_accum`` micro-batches of ``batch_size`` samples over all processes, taken
by :class:`vlmkit.core.engine.step.TrainStep` (forward, loss, backward, optimizer step; the loss is
the token-level cross-entropy normalised by the number of answer tokens in the whole global batch);
the engine orchestrates around it (stages, resume, data order, checkpoints, evaluation, reports).
Checkpoints (:mod:`vlmkit.core.engine.state`) make a run resumable exactly: a resumed run ends
bitwise equal to an uninterrupted one on the CPU.

Precision: ``precision: bf16`` / ``fp16`` runs each forward under autocast (fp16 with a gradient
scaler); the loss is taken in fp32. Whatever dtype a component is loaded in, the parameters a stage
trains are fp32 master weights (:func:`vlmkit.core.tuning.upcast_trainable_to_fp32`, part of
applying the stage's tune modes), so AdamW updates fp32 values; frozen weights keep their dtype. A
model holding both (a decoder loaded in bf16 with trained layers, LoRA adapters or embeddings) needs
autocast: a stage with ``precision: fp32`` on it is refused with the knob to set.

Speed (none of these changes what a step computes, up to the order of floating-point sums):
``run.cache_features`` serves a frozen encoder's features from an in-memory cache keyed by the
frames' pixel content (:mod:`vlmkit.core.engine.features`); ``run.length_groups`` runs each
micro-batch as passes over samples of similar length (:func:`vlmkit.core.data.collate.split_by_length`);
``tune.embeddings: new_tokens`` trains row parameters of the added tokens only
(:class:`vlmkit.core.tuning.NewTokenRows`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader
from tqdm.auto import tqdm

from vlmkit.core.compose import VisionLanguageModel, build_model
from vlmkit.core.data.build import build_dataset
from vlmkit.core.data.collate import Collator
from vlmkit.core.data.rendered import RenderedDataset
from vlmkit.core.engine.features import FeatureCache, describe, encoder_fingerprint
from vlmkit.core.engine.optim import build_optimizer, build_scheduler, param_groups, total_steps
from vlmkit.core.engine.sampler import StageBatchSampler, mix_options
from vlmkit.core.engine.step import TrainStep
from vlmkit.core.engine.state import (
    LoadedState,
    TrainerState,
    capture_rng,
    checkpoint_dirs,
    load_training_state,
    restore_rng,
    save_training_state,
)
from vlmkit.core.errors import VlmkitError
from vlmkit.core.recipe.loader import ResolvedRecipe
from vlmkit.core.recipe.preflight import check_init_from_files
from vlmkit.core.recipe.schema import StageSpec
from vlmkit.core.tuning import (
    StageTuning,
    TuningRecord,
    fit_row_moments,
    new_token_rows,
    records_json,
    release_new_token_rows,
)


class RunInterrupted(VlmkitError):
    """Ctrl-C: a checkpoint was saved; running the same command again resumes."""

    exit_code = 130


@dataclass
class StageResult:
    name: str
    steps: int
    losses: list[float] = field(default_factory=list)
    checkpoint: Path | None = None
    #: run.cache_features: this stage's hits, misses, evictions, bypassed frames and the size held
    #: (None: no cache, or the encoder trained in this stage)
    feature_cache: dict[str, Any] | None = None
    #: forward/backward passes per micro-batch on average (> 1 with run.length_groups)
    passes_per_batch: float = 1.0


@dataclass
class RunResult:
    output_dir: Path
    stages: list[StageResult]
    model: VisionLanguageModel
    resumed_from: Path | None = None
    export: Path | None = None
    complete_before: bool = False  # the folder already held a finished run
    processes: int = 1
    device: str = "cpu"
    #: evaluation label (before, after) -> the results of the recipe's eval list
    evaluations: dict[str, list[Any]] = field(default_factory=dict)


def run(
    resolved: ResolvedRecipe,
    output_dir: Path,
    registry: Any = None,
    progress: bool = True,
    resume: bool | None = None,
    overwrite: bool = False,
) -> RunResult:
    """Train ``resolved`` into ``output_dir``. ``resume``: None = resume when the folder holds
    checkpoints of the same recipe; True = resume (even if the recipe changed); False = refuse a
    folder that holds checkpoints.

    ``output_dir`` must be new, empty or a vlmkit run folder (:mod:`vlmkit.core.engine.run_folder`);
    ``overwrite`` lets the run use another non-empty folder, moving aside (never deleting) whatever
    sits at the paths a run writes."""
    return Engine(resolved, Path(output_dir), registry, progress).run(resume, overwrite)


def same_recipe(stored_yaml: str, resolved: ResolvedRecipe) -> bool:
    """Whether a checkpoint's ``recipe.yaml`` is the recipe ``resolved``: the two parsed mappings of
    the resolved recipes are equal (comments, such as the header naming the source file and the
    ``--set`` options that produced it, key order and formatting do not count). A stored recipe
    that does not parse is a different one."""
    from vlmkit.core.recipe.yaml_io import dump_yaml, parse_yaml_mapping

    try:
        stored = parse_yaml_mapping(stored_yaml, "checkpoint recipe.yaml")
    except VlmkitError:
        return False
    return stored == parse_yaml_mapping(dump_yaml(resolved.data), "resolved recipe")


class Engine:
    def __init__(self, resolved: ResolvedRecipe, output_dir: Path, registry: Any, progress: bool):
        from accelerate import Accelerator

        if registry is None:
            from vlmkit.core.registry import get_registry

            registry = get_registry()
        self.resolved = resolved
        self.recipe = resolved.recipe
        self.output_dir = output_dir
        self.registry = registry
        # without CUDA, cpu=True lets a torchrun-style launch (accelerate launch --multi_gpu) use gloo
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.main = self.accelerator.is_main_process
        self.progress = progress and self.main
        self.trained: set[str] = set()  # parameter names trained so far in the run (the records' names)
        self.tunings: list[TuningRecord] = []  # what each stage's tuning made trainable, in order
        self.log = None
        run_spec = self.recipe.run
        #: the frozen encoder's features, by frame content (run.cache_features); lives for the run
        self.feature_cache = FeatureCache(run_spec.feature_cache_mib * 2**20) if run_spec.cache_features else None
        self._reported: dict[tuple[str, str], str] = {}  # the data reports printed, to print each once

    # ------------------------------------------------------------------ the run
    def run(self, resume: bool | None, overwrite: bool = False) -> RunResult:
        from vlmkit.core.engine.run_folder import check_run_folder, prepare_run_folder

        out = self.output_dir
        folder_kind = check_run_folder(out, overwrite)  # someone's folder: refused before anything is written
        existing = checkpoint_dirs(out) if folder_kind == "run" else []
        if self.recipe.run.export and folder_kind == "run":
            from vlmkit.core.export import check_export_target

            check_export_target(out / "export")  # at the start, not after the training: export/ holds others' files
        state: LoadedState | None = None
        if existing and resume is not False:
            state = load_training_state(existing[-1])
            if resume is None and not same_recipe(state.recipe_yaml, self.resolved):
                raise VlmkitError(
                    f"{out} holds checkpoints of a different recipe (see {existing[-1] / 'recipe.yaml'}); choose another "
                    "--output-dir, or pass --resume to continue that run with this recipe"
                )
        elif existing and resume is False:
            raise VlmkitError(f"{out} already holds checkpoints; choose another --output-dir or resume it")
        elif resume is True:
            raise VlmkitError(f"--resume: {out / 'checkpoints'} holds no checkpoint to resume from")
        # before any model is built: the init_from files of the stages still to start
        check_init_from_files(self.resolved, from_stage=state.trainer.stage_index + 1 if state is not None else 0)

        # the data files are read (and their errors, naming data.<alias>.<option>, raised) before any
        # model is built or anything is written
        records = {alias: build_dataset(self.registry, alias, spec) for alias, spec in self.resolved.datasets.items()}
        self.accelerator.wait_for_everyone()  # every process has looked at the folder before it changes
        if self.main:
            for note in prepare_run_folder(out, folder_kind, self.recipe.name):
                print(note, file=sys.stderr)
            (out / "recipe.yaml").write_text(self.resolved.to_yaml(), encoding="utf-8")
        from vlmkit.core.engine.run_log import RunLog

        self.log = RunLog(out, tensorboard=self.recipe.run.tensorboard, enabled=self.main)
        model = build_model(self.resolved, self.registry)
        if self.recipe.run.gradient_checkpointing:
            model.decoder.enable_gradient_checkpointing()
        model.to(self.accelerator.device)
        self.datasets = {
            alias: RenderedDataset(records[alias], model.templates.get(alias), model.decoder.tokenizer, alias)
            for alias in self.resolved.datasets
        }
        stages = self.recipe.stages
        results: list[StageResult] = []
        start, mid_stage = 0, None
        # metrics.jsonl keeps only the steps of the checkpoint resumed from (none: a fresh start, e.g.
        # after a kill before the first checkpoint), so no step is logged twice
        self.log.truncate_after(state.trainer.global_step if state is not None else 0)
        if self.main:  # the same for evaluations during training: the steps still to come are evaluated anew
            from vlmkit.core.evaluation.curve import drop_step_evaluations_after

            drop_step_evaluations_after(out, state.trainer.global_step if state is not None else 0)
        if state is not None:
            start, mid_stage = self._restore(model, state)
            for k in range(start):
                results.append(StageResult(stages[k].name, len(state.trainer.losses.get(stages[k].name, [])),
                                           list(state.trainer.losses.get(stages[k].name, []))))
        self.losses = dict(state.trainer.losses) if state is not None else {}
        self.global_step = state.trainer.global_step if state is not None else 0
        complete_before = state is not None and start >= len(stages)
        evaluations: dict[str, list[Any]] = {}
        if self.recipe.eval and self.recipe.run.eval_before:
            evaluations["before"] = self._evaluate(model, "before", reuse=state is not None)
        for k in range(start, len(stages)):
            if not stages[k].enabled:
                if self.progress:
                    tqdm.write(f"stage {stages[k].name}: skipped (enabled: false)")
                continue
            results.append(self._stage(model, k, mid_stage if k == start else None))
        release_new_token_rows(model.decoder)  # the tables hold the trained rows
        if self.recipe.eval:
            evaluations["after"] = self._evaluate(model, "after", reuse=complete_before)
            if self.main and self.recipe.run.eval_every:
                from vlmkit.core.evaluation.curve import write_learning_curve

                write_learning_curve(out, self.global_step)
        export = None
        if self.main and self.recipe.run.export:
            from vlmkit.core.export import export_model

            export = out / "export"
            if not (complete_before and export.is_dir()):
                export_model(model, self.resolved, export, merge_lora=self.recipe.run.merge_lora)
        if self.main:
            self.log.close()
        self.accelerator.wait_for_everyone()
        return RunResult(out, results, model, state.path if state else None, export, complete_before,
                         self.accelerator.num_processes, self.accelerator.device.type, evaluations)

    def _evaluate(self, model: VisionLanguageModel, label: str, reuse: bool) -> list[Any]:
        """The recipe's eval list on the main process (``reuse``: read the results a previous run of
        this folder wrote, if they are all there); the other processes wait."""
        from vlmkit.core.evaluation.runner import EVAL_DIR, read_result, run_evaluations

        results: list[Any] = []
        if self.main:
            folder = self.output_dir / EVAL_DIR / label
            files = sorted(folder.glob("*.json")) if folder.is_dir() else []
            if reuse and len(files) == len(self.recipe.eval):
                results = [read_result(f) for f in files]
            else:
                if self._sharded():
                    raise VlmkitError("the recipe's eval list runs on one process and cannot evaluate a sharded "
                                      "(FSDP/DeepSpeed) model; evaluate the export with `recipes eval` instead")
                if self.progress:
                    tqdm.write(f"evaluating ({label} training)")
                results = run_evaluations(model, self.resolved, self.output_dir, label, registry=self.registry,
                                          progress=self.progress)
        self.accelerator.wait_for_everyone()
        return results

    def _evaluate_during(self, model: VisionLanguageModel, report: dict[str, dict[str, int]]) -> None:
        """``run.eval_every``: the eval list at this global step (label ``step-<n>``). The training's
        random state and modes are put back, so the steps after it are the same as without it."""
        from vlmkit.core.evaluation.curve import step_label

        rng = capture_rng()
        model.eval()
        try:
            self._evaluate(model, step_label(self.global_step), reuse=False)
        finally:
            self._train_mode(model, report)
            restore_rng(*rng)

    @staticmethod
    def _train_mode(model: VisionLanguageModel, report: dict[str, dict[str, int]]) -> None:
        """Training mode, except that frozen parts keep BatchNorm statistics and run no dropout."""
        model.train()
        for comp, counts in report.items():
            if comp in model.component_names and counts["trainable"] == 0:
                getattr(model, comp).eval()

    def _restore(self, model: VisionLanguageModel, state: LoadedState) -> tuple[int, LoadedState | None]:
        """Rebuild the trainable structure of every stage up to the checkpoint's (LoRA adapters are
        created there), load the weights, and say where to go on."""
        t = state.trainer
        for k in range(t.stage_index + 1):
            if not self.recipe.stages[k].enabled:
                continue
            self._tune(model, k)
        params = dict(model.named_parameters())
        unknown = sorted(set(state.weights) - set(params))
        if unknown:
            raise VlmkitError(f"checkpoint {state.path} has weights this recipe's model lacks, e.g. {unknown[:3]}")
        with torch.no_grad():
            for name, value in state.weights.items():
                if params[name].shape != value.shape:
                    raise VlmkitError(f"checkpoint {state.path}: {name} has shape {tuple(value.shape)}, the model {tuple(params[name].shape)}")
                params[name].copy_(value)
        if self.main:
            tqdm.write(f"resuming from {state.path} (stage {t.stage}, step {t.step}{', complete' if t.stage_done else ''})")
        if t.stage_done:
            restore_rng(state.rng_tensors, state.rng_plain)
            return t.stage_index + 1, None
        return t.stage_index, state

    # ------------------------------------------------------------------ one stage
    def _stage(self, model: VisionLanguageModel, k: int, state: LoadedState | None) -> StageResult:
        acc = self.accelerator
        stage = self.recipe.stages[k]
        label = f"stages.{k}"
        if stage.init_from is not None and state is None:
            self._init_from(model, stage, label)
        # trainable parameters now fp32 master weights; new_tokens: row parameters of the added tokens
        report = self._tune(model, k).report
        self._check_precision(model, stage, label)
        groups = param_groups(model, stage)
        if not groups:
            raise VlmkitError(f"{label}.tune: stage '{stage.name}' trains no parameters; set some component to full, lora or partial")
        self._report(stage.name, report, model.compute_dtype)
        optimizer = build_optimizer(groups, stage)
        parts = [self.datasets[a] for a in stage.data]
        data = ConcatDataset(parts)
        consumed = state.trainer.consumed if state else 0
        sampler = StageBatchSampler(
            [len(p) for p in parts], stage.batch_size, seed=self.recipe.seed, stage_index=k,
            **mix_options(stage, self.recipe.data), rank=acc.process_index, world_size=acc.num_processes,
            start=consumed, where=label, names=list(stage.data),
        )
        train_step = self.train_step(model, stage, report)
        collator = model.collator(max_length=stage.max_length, frame_keys=train_step.feature_cache is not None)
        total = total_steps(stage, sampler.batches_per_epoch)
        scheduler = build_scheduler(optimizer, stage, total)
        scaler = torch.amp.GradScaler(acc.device.type) if stage.precision == "fp16" else None
        step = 0
        losses: list[float] = []
        if state is not None:
            if state.optimizer is not None:
                optimizer.load_state_dict(state.optimizer)
                fit_row_moments(model, optimizer)  # a checkpoint whose new_tokens moments were table-sized
            elif self.main:
                tqdm.write(f"warning: {state.path} holds no optimizer state (sharded training); AdamW's moments restart")
            scheduler.load_state_dict(state.scheduler)
            if scaler is not None and state.scaler is not None:
                scaler.load_state_dict(state.scaler)
            step = state.trainer.step
            losses = list(self.losses.get(stage.name, []))[:step]
            restore_rng(state.rng_tensors, state.rng_plain)
        wrapped, optimizer = acc.prepare(model, optimizer)
        rows = new_token_rows(model.decoder)
        if rows is not None:
            rows.rebind()  # prepare may copy the model's tensors (to "cpu:0" on several CPU processes)
        self._wrapped = wrapped
        self._train_mode(model, report)
        loader = DataLoader(
            data, batch_sampler=sampler, collate_fn=collator, num_workers=self.recipe.run.num_workers,
            generator=torch.Generator(),  # never draw from the global generator (exact resume)
        )
        batches = iter(loader)
        trainable = [p for g in groups for p in g["params"]]
        bar = tqdm(total=total, initial=step, desc=f"stage {stage.name}", disable=not self.progress, dynamic_ncols=True)
        last_saved = step if state is not None else -1
        safe = (capture_rng(), consumed)  # generator states and data position after the last whole step
        cache_before = self.feature_cache.stats() if train_step.feature_cache is not None else None
        passes, batches_run = 0, 0
        try:
            while step < total:
                t0 = time.perf_counter()
                micro = [next(batches) for _ in range(stage.grad_accum)]
                if (consumed + stage.grad_accum) // sampler.batches_per_epoch > consumed // sampler.batches_per_epoch:
                    self._data_report(stage, parts, collator)  # an epoch ended
                consumed += stage.grad_accum
                done = train_step(
                    wrapped, micro, optimizer, trainable, scaler, where=f"stage '{stage.name}' step {step + 1}",
                    advice=f"; the last good checkpoint is kept in {self.output_dir / 'checkpoints'}; lower the "
                    "learning rate or check these samples",
                )
                loss_value, n_samples = done.loss, done.samples
                passes += done.passes
                batches_run += len(micro)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                self.global_step += 1
                safe = (capture_rng(), consumed)
                losses.append(loss_value)
                self.losses[stage.name] = losses
                elapsed = time.perf_counter() - t0
                lr = scheduler.get_last_lr()[0]
                if step % stage.log_every == 0 or step == total:
                    self.log.write({
                        "stage": stage.name, "stage_index": k, "step": step, "global_step": self.global_step,
                        "loss": loss_value, "lr": lr, "samples_per_s": n_samples / elapsed,
                    })
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", sps=f"{n_samples / elapsed:.1f}")
                bar.update(1)
                every = self.recipe.run.eval_every
                if every and self.recipe.eval and step % every == 0 and step < total:
                    self._evaluate_during(model, report)
                every = self.recipe.run.checkpoint_every
                if every and step % every == 0 and step < total:
                    self._save(model, optimizer, scheduler, scaler, k, step, consumed, False)
                    last_saved = step
        except KeyboardInterrupt:
            bar.close()
            if step > last_saved and step > 0:
                rng, at = safe  # a half-done step is dropped: the resumed run repeats it exactly
                path = self._save(model, optimizer, scheduler, scaler, k, step, at, False, rng=rng)
                raise RunInterrupted(f"interrupted at stage '{stage.name}' step {step}; checkpoint saved in {path}; "
                                     "run the same command again to resume") from None
            raise RunInterrupted(f"interrupted at stage '{stage.name}' step {step}; run the same command again to resume") from None
        bar.close()
        self._data_report(stage, parts, collator)
        cache = describe(cache_before, self.feature_cache.stats()) if cache_before is not None else None
        passes = passes / batches_run if batches_run else 1.0
        self._speed_report(stage, cache, passes, train_step.length_groups)
        checkpoint = self._save(model, optimizer, scheduler, scaler, k, step, consumed, True)
        return StageResult(stage.name, step, losses, checkpoint, cache, passes)

    def _tune(self, model: VisionLanguageModel, k: int) -> TuningRecord:
        """Apply stage ``k``'s tuning (the previous one's gradient masks removed) and keep its record."""
        tuning = StageTuning(self.recipe.stages[k].tune, f"stages.{k}.tune", new_token_rows=not self._sharded())
        record = tuning.apply(model, previous=self.tunings[-1] if self.tunings else None)
        if self.tunings and self.tunings[-1].stage == record.stage:
            self.tunings[-1] = record  # a resumed stage, applied again after its restore
        else:
            self.tunings.append(record)
        self.trained |= set(record.names)
        return record

    def train_step(self, model: VisionLanguageModel, stage: StageSpec, report: dict[str, dict[str, int]]) -> TrainStep:
        """The stage's training step (:class:`~vlmkit.core.engine.step.TrainStep`) with its precision,
        clipping and use of run.cache_features and run.length_groups (``report``: its tuning's
        trainable counts per component)."""
        use_cache = self._cache_for_stage(model, stage, report)
        return TrainStep(
            self.accelerator, precision=stage.precision, max_grad_norm=stage.max_grad_norm,
            length_groups=self._groups_for_stage(model, stage, report),
            feature_cache=self.feature_cache if use_cache else None,
        )

    def _cache_for_stage(self, model: VisionLanguageModel, stage: StageSpec, report: dict[str, dict[str, int]]) -> bool:
        """Whether this stage reads the encoder's features from the cache: with run.cache_features,
        where the encoder is frozen. Binds the cache to the encoder's current weights (entries made
        with other weights are dropped)."""
        cache = self.feature_cache
        if cache is None:
            return False
        if report["encoder"]["trainable"]:
            cache.clear()  # its weights change from the first step on
            if self.progress:
                tqdm.write(f"stage {stage.name}: run.cache_features: the encoder trains in this stage, so its "
                           "features are computed at every step (cache not used)")
            return False
        if cache.bind(encoder_fingerprint(model.encoder)) and self.progress:
            tqdm.write(f"stage {stage.name}: the encoder's weights changed; the feature cache starts empty")
        return True

    def _groups_for_stage(self, model: VisionLanguageModel, stage: StageSpec, report: dict[str, dict[str, int]]) -> int:
        """run.length_groups, unless a training component normalises over the batch (BatchNorm in
        train mode), whose output would then depend on how the micro-batch is split."""
        groups = self.recipe.run.length_groups
        if groups <= 1:
            return 1
        batch_norm = [
            comp for comp in model.component_names
            if report[comp]["trainable"] and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                                 for m in getattr(model, comp).modules())
        ]
        if batch_norm:
            if self.progress:
                tqdm.write(f"stage {stage.name}: run.length_groups: {', '.join(batch_norm)} trains with batch "
                           "normalisation, whose statistics depend on the batch; micro-batches run whole")
            return 1
        return groups

    def _speed_report(self, stage: StageSpec, cache: dict[str, Any] | None, passes: float, groups: int) -> None:
        if not self.progress:
            return
        if cache is not None:
            mib = 2**20
            line = (f"stage {stage.name} features: cache {cache['hits']} hits, {cache['misses']} misses "
                    f"({cache['hit_rate']:.0%} of frames served from memory); {cache['entries']} frames held, "
                    f"{cache['bytes'] / mib:.1f} of {cache['limit_bytes'] / mib:.0f} MiB, {cache['evictions']} evicted")
            if cache["bypassed"]:
                line += f"; {cache['bypassed']} frames encoded without it (encoder not frozen or not in eval mode)"
            tqdm.write(line)
        if groups > 1:
            tqdm.write(f"stage {stage.name}: run.length_groups {groups}: {passes:.2f} passes per micro-batch")

    @staticmethod
    def _check_precision(model: VisionLanguageModel, stage: StageSpec, label: str) -> None:
        """A model with fp32 master weights beside frozen half-precision ones computes only under
        autocast: refuse ``precision: fp32`` there (it would mix dtypes in one matrix product)."""
        half = model.compute_dtype
        if half is None or stage.precision != "fp32":
            return
        stored = {p.dtype for p in model.parameters()}
        if not stored & {torch.bfloat16, torch.float16}:
            return  # every half-precision weight trains (now fp32): plain fp32 compute works
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[half]
        raise VlmkitError(
            f"{label}.precision: 'fp32', but the model holds frozen {name} weights (a component loaded with "
            f"dtype {str(half).removeprefix('torch.')}) beside the fp32 master weights of the trained ones; "
            f"set {label}.precision: {name} to compute in {name} under autocast (master weights stay fp32), "
            "or load that component in float32"
        )

    def _init_from(self, model: VisionLanguageModel, stage: StageSpec, label: str) -> None:
        """Load the stage's ``init_from`` weights (before its tuning wraps anything in adapters)."""
        init = stage.init_from
        path = Path(init.path).expanduser()
        where = f"{label}.init_from.path"
        if not path.is_file():
            raise VlmkitError(f"{where}: '{path}' does not exist")
        if init.format == "openflamingo":
            from vlmkit.core.importers.openflamingo import import_openflamingo

            try:
                loaded = import_openflamingo(model, path, strict=init.strict, added_tokens=init.added_tokens)
            except VlmkitError as exc:
                raise VlmkitError(f"{where}: {exc}") from None
        else:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                weights = load_file(str(path))
            except (SafetensorError, OSError) as exc:
                raise VlmkitError(f"{where}: '{path}' is not a readable safetensors file: {exc}") from None
            own = model.state_dict()
            bad = [k for k, v in weights.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
            if bad:
                raise VlmkitError(f"{where}: {len(bad)} tensors of '{path}' are not in this model with the same shape, "
                                  f"e.g. {bad[:3]}")
            model.load_state_dict(weights, strict=False)
            loaded = sorted(weights)
        if self.progress:
            tqdm.write(f"stage {stage.name}: loaded {len(loaded)} tensors from {path} ({init.format})")

    def _data_report(self, stage: StageSpec, parts: list[RenderedDataset], collator: Collator) -> None:
        """What the data pipeline skipped or shortened in this stage (bad records, long samples)."""
        if not self.main:
            return
        # a dataset's summary counts every record it skipped in the run; the max_length line, this stage's
        lines = {("data", p.alias): f"{p.alias}: {p.summary()}" for p in parts if p.summary()}
        stats = collator.stats
        if stats.get("dropped_examples") or stats.get("dropped_samples"):
            line = (f"max_length {stage.max_length}: {stats.get('truncated_samples', 0)} samples lost "
                    f"{stats.get('dropped_examples', 0)} in-context examples")
            if stats.get("dropped_samples"):
                line += f"; {stats['dropped_samples']} samples left out (e.g. {', '.join(collator.dropped_ids)})"
            lines[("max_length", stage.name)] = line
        # called at each epoch's end and at the stage's end: a report is printed again only when it changed
        for key, line in lines.items():
            if self._reported.get(key) != line:
                self._reported[key] = line
                tqdm.write(f"stage {stage.name} data: {line}")

    # ------------------------------------------------------------------ saving, reporting
    def _save(self, model, optimizer, scheduler, scaler, k, step, consumed, done, rng=None) -> Path:
        acc = self.accelerator
        stage = self.recipe.stages[k]
        path = self.output_dir / "checkpoints" / f"step-{self.global_step:08d}"
        sharded = self._sharded()
        if sharded:  # gather the full weights (every rank takes part); optimizer moments stay sharded
            full = acc.get_state_dict(self._wrapped)
        if self.main:
            if sharded:
                weights = {n: full[n].detach().to("cpu").contiguous().clone() for n in self.trained if n in full}
            else:
                weights = {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if n in self.trained}
            trainer = TrainerState(k, stage.name, step, self.global_step, consumed, done, dict(self.losses))
            path = save_training_state(
                self.output_dir, weights=weights, optimizer=None if sharded else optimizer, scheduler=scheduler, scaler=scaler,
                trainer=trainer, recipe_yaml=self.resolved.to_yaml(), keep_last=self.recipe.run.keep_last, rng=rng,
                tuning_json=records_json(self.tunings),
            )
        acc.wait_for_everyone()
        return path

    def _sharded(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def _report(self, stage: str, report: dict[str, dict[str, int]], half: torch.dtype | None = None) -> None:
        if not self.progress:
            return
        lines = [f"stage {stage}: parameters", f"  {'part':<10} {'trainable':>14} {'frozen':>14}"]
        for comp, counts in report.items():
            lines.append(f"  {comp:<10} {counts['trainable']:>14,} {counts['frozen']:>14,}")
        saved = len(self.trained)
        lines.append(f"  checkpoints hold the {saved} parameter tensors trained so far, optimizer, scheduler, RNG and data position")
        if half is not None:
            lines.append(f"  trained parameters are fp32 master weights; frozen ones loaded in {str(half).removeprefix('torch.')} stay so")
        tqdm.write("\n".join(lines))
