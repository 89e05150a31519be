"""Shared pieces of ``benchmarks/speed.py``: the machine, timing, peak memory, the benchmark
recipes (built through vlmkit's own recipe loader and builder), shared inputs and training steps.

Nothing here measures anything by itself; ``speed.py`` decides what runs in which process.
"""

from __future__ import annotations

import gc
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
IMAGE = "<image>"
EOC = "<|endofchunk|>"

# ------------------------------------------------------------------------------ shared configuration
#: the tiny shared configuration (a 4-layer Llama of width 256, random weights)
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
}
#: tiny open_clip ViT for the Flamingo comparison: 56 px, patches of 8 -> 49 tokens of width 128
TINY_OPEN_CLIP_VISION = {"image_size": 56, "patch_size": 8, "width": 128, "layers": 2, "head_width": 32}
TINY_OPEN_CLIP_TEXT = {"width": 32, "heads": 2, "layers": 1}
#: tiny transformers CLIP vision tower for the prefix / LLaVA comparison: also 49 patch tokens
TINY_CLIP_VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 56,
    "patch_size": 8,
}
#: OpenFlamingo's Flamingo builds PerceiverResampler(dim) and GatedCrossAttentionBlock(dim, dim_visual)
#: with their defaults; the tiny vlmkit model is given the same dimensions
OF_PERCEIVER = {"num_latents": 64, "depth": 6, "heads": 8, "dim_head": 64, "ff_mult": 4}
OF_XATTN = {"heads": 8, "dim_head": 64, "ff_mult": 4, "only_attend_immediate_media": True}

BATCH = 4  # samples per training batch
IMAGES_PER_SAMPLE = 2
TEXT_TOKENS = 256  # text tokens per sample (image tokens come on top, as the fusion needs them)
LR = 1.0e-4

SCALES = ("tiny", "demo")


# ------------------------------------------------------------------------------ the machine
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    dev = device()
    info = {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": dev.type,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


# ------------------------------------------------------------------------------ timing
def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call of ``fn`` (device work included)."""
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def time_interleaved(
    sides: dict[str, Callable[[], Any]], reps: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """Warm every side up, then time ``reps`` calls of each, alternating the sides (and their order
    from one repetition to the next) so that drift in the machine's speed hits them alike.
    Returns the seconds of each timed call and what each call returned, per side."""
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    returned: dict[str, list[Any]] = {name: [] for name in names}
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            box: list[Any] = []
            times[name].append(timed(lambda fn=sides[name]: box.append(fn())))
            returned[name].append(box[0])
    return times, returned


# ------------------------------------------------------------------------------ peak memory
def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """Peak memory of what runs between :meth:`start` and :meth:`stop`, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the process's resident high-water
    mark (``VmHWM``) after resetting it by writing ``5`` to ``/proc/self/clear_refs``, minus the
    resident size at the start; where the reset is impossible, ``ru_maxrss`` (the whole process's
    peak, build included) is reported instead and ``method`` says so."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.method = ""
        self.base_mib = 0.0

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base_mib = torch.cuda.memory_allocated() / 2**20
            self.method = "torch.cuda.max_memory_allocated"
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM after /proc/self/clear_refs reset"
        except OSError:
            self.method = "ru_maxrss (process peak, no reset possible)"
        self.base_mib = (_status_kib("VmRSS") or 0) / 1024

    def stop(self) -> dict[str, Any]:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        elif self.method.startswith("VmHWM"):
            peak = (_status_kib("VmHWM") or 0) / 1024
        else:
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = kib / 2**20 if sys.platform == "darwin" else kib / 1024
        return {
            "peak_mib": round(peak, 1),
            "base_mib": round(self.base_mib, 1),
            "delta_mib": round(peak - self.base_mib, 1),
            "method": self.method,
            "process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }


# ------------------------------------------------------------------------------ recipes
def quiet() -> None:
    """Keep library chatter (generation flags, load reports) out of the benchmark's output."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)  # e.g. open_clip's "no pretrained weights loaded" (wanted here)


def shipped_mapping(name: str) -> dict[str, Any]:
    from vlmkit.core.recipe.loader import find_recipe

    return yaml.safe_load(find_recipe(name).read_text())


def load(mapping: dict[str, Any], profile: str | None) -> Any:
    """A recipe mapping written to a temporary YAML file and loaded as vlmkit loads any recipe."""
    from vlmkit.core.recipe.loader import load_recipe

    with tempfile.TemporaryDirectory(prefix="vlmkit-bench-") as tmp:
        path = Path(tmp) / f"{mapping['name']}.yaml"
        path.write_text(yaml.safe_dump(mapping, sort_keys=False))
        return load_recipe(path, profile=profile)


def _one_stage(mapping: dict[str, Any], tune: dict[str, Any], data: list[str]) -> None:
    mapping["stages"] = [{
        "name": "bench", "data": data, "tune": tune, "lr": LR, "schedule": "constant",
        "max_steps": 1000, "batch_size": BATCH,
    }]
    mapping.pop("eval", None)
    mapping.setdefault("run", {})["eval_before"] = False


FLAMINGO_TUNE = {"encoder": "frozen", "connector": "full", "fusion": "full", "decoder": "frozen"}
PREFIX_TUNE = {"encoder": "frozen", "connector": "full", "fusion": "frozen", "decoder": "full"}


def _bench_recipe(scale: str, case: str, tiny_model: dict[str, Any], shipped: str, tune: dict[str, Any]) -> Any:
    """One training stage of ``tune`` over ``tiny_model`` (on the toy recipe's data) at tiny scale,
    or over the shipped recipe's demo model at demo scale."""
    if scale == "tiny":
        mapping = shipped_mapping("toy_prefix")
        mapping["name"] = f"bench_{case}_tiny"
        mapping["model"] = tiny_model
        _one_stage(mapping, dict(tune), ["shapes"])
        mapping.pop("profiles", None)
        mapping.pop("default_profile", None)
        return load(mapping, None)
    mapping = shipped_mapping(shipped)
    mapping["name"] = f"bench_{case}_demo"
    _one_stage(mapping, dict(tune), ["captions"])
    for profile in mapping.get("profiles", {}).values():
        if isinstance(profile, dict):
            profile.pop("stages", None)
            profile.pop("eval", None)
    return load(mapping, "demo")


def flamingo_recipe(scale: str) -> Any:
    """Flamingo-style model and its training stage (perceiver and cross-attention train).

    tiny: open_clip ViT (49 tokens) -> OpenFlamingo-sized perceiver -> cross-attention every 2 layers
    of the tiny Llama. demo: the ``otter_mimicit`` recipe's demo model as shipped."""
    tiny = {
        "encoder": {"name": "open_clip", "model_name": "ViT-B-32",
                    "model_cfg": {"vision_cfg": dict(TINY_OPEN_CLIP_VISION), "text_cfg": dict(TINY_OPEN_CLIP_TEXT)}},
        "connector": {"name": "perceiver", **OF_PERCEIVER},
        "fusion": {"name": "gated_cross_attention", "every_n_layers": 2, **OF_XATTN},
        "decoder": {"name": "hf_causal_lm", "tokenizer_type": "byte_level", "config": dict(TINY_LLAMA),
                    "special_tokens": [EOC]},
    }
    return _bench_recipe(scale, "flamingo", tiny, "otter_mimicit", FLAMINGO_TUNE)


def prefix_recipe(scale: str) -> Any:
    """LLaVA-style model and its training stage (projector and decoder train).

    tiny: transformers CLIP vision tower (penultimate layer, 49 patch tokens) -> mlp2x_gelu -> prefix
    -> the tiny Llama. demo: the ``llava`` recipe's demo model as shipped (EfficientNet-Lite0,
    SmolLM2-135M)."""
    tiny = {
        "encoder": {"name": "hf_vision", "config": dict(TINY_CLIP_VISION), "select_layer": -2,
                    "select_feature": "patch"},
        "connector": {"name": "mlp", "projector": "mlp2x_gelu"},
        "fusion": {"name": "prefix"},
        "decoder": {"name": "hf_causal_lm", "tokenizer_type": "byte_level", "config": dict(TINY_LLAMA)},
    }
    return _bench_recipe(scale, "prefix", tiny, "llava", PREFIX_TUNE)


def build(resolved: Any, meta: bool = False) -> Any:
    from vlmkit.core.compose import build_model

    model = build_model(resolved, meta=meta)
    if not meta:
        model.to(device())
    return model


# ------------------------------------------------------------------------------ inputs
def text_ids(tokenizer: Any, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random ordinary (non-special, non-added) token ids of ``shape``."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    limit = min(len(tokenizer), 32000)
    allowed = torch.tensor([i for i in range(limit) if i not in special], dtype=torch.long)
    return allowed[torch.randint(0, len(allowed), shape, generator=generator)]


def make_batch(model: Any, batch: int, text_tokens: int, images: int = IMAGES_PER_SAMPLE, seed: int = 0,
               labels: bool = True) -> dict[str, Any]:
    """A batch as the collator writes it, for ``model``'s fusion: per sample ``images`` images, each
    as the fusion's ``<image>`` placeholders (1 for cross-attention, one per token for prefix),
    spread evenly through ``text_tokens`` random text tokens; no padding."""
    tok = model.decoder.tokenizer
    image_id = int(tok.convert_tokens_to_ids(IMAGE))
    placeholders = model.placeholder_tokens()
    g = torch.Generator().manual_seed(seed)
    text = text_ids(tok, (batch, text_tokens), g)
    chunk = text_tokens // images
    rows, trained_rows = [], []
    for b in range(batch):
        parts, trained = [], []
        for i in range(images):
            parts.append(torch.full((placeholders,), image_id, dtype=torch.long))
            trained.append(torch.zeros(placeholders, dtype=torch.bool))
            end = text_tokens if i == images - 1 else (i + 1) * chunk
            parts.append(text[b, i * chunk : end])
            # as instruction data: each image's text is a prompt, then an answer (its last quarter)
            # that is trained; prompts and image placeholders are not
            n = end - i * chunk
            trained.append(torch.arange(n) >= n - n // 4)
        rows.append(torch.cat(parts))
        trained_rows.append(torch.cat(trained))
    input_ids = torch.stack(rows)
    size = model.encoder.preprocess.image_size
    out = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "vision_x": torch.randn(batch, images, 1, 3, size, size, generator=g),
        "media_mask": torch.ones(batch, images, dtype=torch.bool),
        "ids": [f"bench-{b}" for b in range(batch)],
    }
    if labels:
        out["labels"] = input_ids.masked_fill(~torch.stack(trained_rows), -100)
    return out


def to_device(batch: dict[str, Any]) -> dict[str, Any]:
    dev = device()
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------ training steps
class VlmkitTrainer:
    """One training step of a vlmkit model exactly as the engine takes it: the stage's tune modes
    (:func:`vlmkit.core.tuning.apply_tuning`), its parameter groups and AdamW, frozen components in
    eval mode, and the engine's own training step (:class:`vlmkit.core.engine.step.TrainStep` as
    ``Engine.train_step`` configures it for the stage: forward, token-level cross-entropy, backward,
    gradient clipping at the stage's ``max_grad_norm``, optimizer step), then the scheduler step and
    ``zero_grad(set_to_none=True)``.

    The recipe's ``run.cache_features`` and ``run.length_groups`` apply as in the engine (batches
    then need the collator's ``frame_keys``); ``new_token_rows=False`` trains ``embeddings:
    new_tokens`` as whole tables with a masked gradient (how vlmkit did before the row parameters)."""

    def __init__(self, model: Any, resolved: Any, stage_index: int = 0, new_token_rows: bool = True):
        from vlmkit.core.engine.optim import build_optimizer, build_scheduler, param_groups
        from vlmkit.core.engine.trainer import Engine
        from vlmkit.core.tuning import apply_tuning, new_token_rows as rows_of

        self.stage = resolved.recipe.stages[stage_index]
        report = apply_tuning(model, self.stage.tune, f"stages.{stage_index}", new_token_rows=new_token_rows).report
        groups = param_groups(model, self.stage)
        self.trainable = [p for g in groups for p in g["params"]]
        self._tmp = tempfile.TemporaryDirectory(prefix="vlmkit-bench-run-")
        self.engine = Engine(resolved, Path(self._tmp.name), None, False)
        optimizer = build_optimizer(groups, self.stage)
        self.scheduler = build_scheduler(optimizer, self.stage, 10**6)
        self.model, self.optimizer = self.engine.accelerator.prepare(model, optimizer)
        rows = rows_of(model.decoder)
        if rows is not None:
            rows.rebind()  # as the engine does after prepare
        model.train()
        for comp, counts in report.items():
            if comp in model.component_names and counts["trainable"] == 0:
                getattr(model, comp).eval()
        self.train_step = self.engine.train_step(model, self.stage, report)
        self.counts = report
        self.passes = 0  # forward/backward passes run so far (> steps with run.length_groups)

    def optimizer_state_bytes(self) -> int:
        """Bytes of the optimizer's tensors (AdamW's moments) after at least one step."""
        return sum(v.numel() * v.element_size() for state in self.optimizer.state.values()
                   for v in state.values() if isinstance(v, torch.Tensor) and v.ndim > 0)

    def step(self, batch: dict[str, Any]) -> float:
        done = self.train_step(self.model, [batch], self.optimizer, self.trainable, where="benchmark step")
        self.passes += done.passes
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return done.loss


class ReferenceTrainer:
    """A reference model's training step: ``loss_fn()`` (the model's own loss from ``labels``),
    backward, clipping at ``max_grad_norm`` (as vlmkit's stage, OpenFlamingo's and LLaVA's training
    scripts do), AdamW over ``params`` with vlmkit's betas, eps and learning rate, ``zero_grad``."""

    def __init__(self, params: list[torch.nn.Parameter], stage: Any, loss_fn: Callable[[], torch.Tensor]):
        self.params = [p for p in params if p.requires_grad]
        self.stage = stage
        self.loss_fn = loss_fn
        self.optimizer = torch.optim.AdamW(self.params, lr=stage.lr, betas=stage.optimizer.betas,
                                           eps=stage.optimizer.eps, weight_decay=stage.optimizer.weight_decay)

    def step(self) -> float:
        loss = self.loss_fn()
        loss.backward()
        if self.stage.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.stage.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def count_params(params: Any) -> int:
    return sum(p.numel() for p in params if p.requires_grad)


def step_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call of ``step`` (matmuls, convolutions, attention; forward and backward) as
    ``torch.utils.flop_counter.FlopCounterMode`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def matmul_peak_gflops(reps: int, warmup: int, n: int = 2048) -> dict[str, Any]:
    """Median GFLOP/s of ``n x n`` fp32 ``torch.matmul`` on this device."""
    dev = device()
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dev)
    b = torch.randn(n, n, generator=g).to(dev)
    times = time_interleaved({"matmul": lambda: torch.matmul(a, b)}, max(reps, 3), max(warmup, 1))[0]["matmul"]
    flops = 2 * n**3
    return {"n": n, "seconds": times, "gflops": flops / median(times) / 1e9,
            "gflops_reps": [flops / t / 1e9 for t in times]}
