"""Speed benchmarks of vlmkit against reference implementations, on this machine.

Six comparisons, each a ratio measured in one process on the same inputs (the two sides' steps
interleaved, each figure the median of ``--reps`` timed repetitions after ``--warmup``):

1. ``flamingo``: a Flamingo-style training step (encoder frozen; perceiver and gated
   cross-attention train; decoder frozen) of vlmkit vs OpenFlamingo 2.0.1's ``Flamingo`` with the
   same decoder, perceiver and cross-attention dimensions: steps/s, and peak memory measured in a
   fresh process per side. Tiny and demo scale.
2. ``prefix``: a LLaVA-style training step (encoder frozen; MLP projector and decoder train) of
   vlmkit vs transformers' ``LlavaForConditionalGeneration`` with the same CLIP vision tower and
   Llama: steps/s and peak memory. Tiny scale.
3. ``generation``: greedy generation with the KV cache (32 new tokens, batch 1 and 4) through both
   vlmkit fusions vs the bare decoder's own ``generate`` on a prompt of the same total length:
   tokens/s. Tiny and demo scale.
4. ``data``: the ``otter_mimicit`` demo data through the engine's data pipeline (decoding,
   chat template, collation, DataLoader with 0 and 2 workers): samples/s, against the demo otter
   training step's samples/s (from 1).
5. ``mfu``: FLOPs of a training step (``torch.utils.flop_counter.FlopCounterMode``) over its time,
   against this machine's measured fp32 matmul rate.
6. ``throughput``: the ``otter_mimicit`` demo's own training step (its stages' tune modes, real demo
   batches of both stages in data order) in trained tokens/s, with the engine's speed switches on
   (as the demo profile sets them: feature cache, length groups, new-token row parameters) against
   all of them off (features encoded at every step, whole micro-batches, whole embedding tables
   with a masked gradient), and with the switches on but the cache emptied before every step.
   Demo scale only.

The scales: ``tiny`` (a 4-layer Llama of width 256 with random weights, 2 images per sample of 49
encoder tokens each, batch 4, 256 text tokens) and ``demo`` (the shipped recipes' demo models:
EfficientNet-Lite0 with 49 tokens of width 320 at 224 px, SmolLM2-135M-Instruct from its GGUF file,
at the same batch, images and text).

    python benchmarks/speed.py                          # everything; writes benchmarks/results.{md,json}
    python benchmarks/speed.py --only flamingo,prefix --scales tiny --reps 1 --warmup 0

Every measurement runs in a fresh subprocess (this file with ``--child``): a timing builds both
sides in one process and interleaves their steps; a peak-memory measurement builds one side alone.
The parent only orchestrates (one child at a time) and writes the results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_common as bc  # noqa: E402

COMPARISONS = ("flamingo", "prefix", "generation", "data", "mfu", "throughput")
GEN_NEW_TOKENS = 32
GEN_TEXT_TOKENS = 64  # text tokens of a generation prompt (besides its 2 images)
GEN_BATCHES = (1, 4)
DATA_BATCHES_PER_REP = 16  # micro-batches (of the stage's batch size) pulled per timed repetition
THROUGHPUT_BATCHES = {"align": 2, "instruct": 3}  # demo batches per timed repetition, first of each stage

TARGETS = {
    "train_speed": 1.2,  # vlmkit Flamingo step >= 1.2x OpenFlamingo's steps/s
    "train_memory": 1.0,  # ... at equal or lower peak memory
    "prefix_speed": 1.0,  # vlmkit prefix step >= 1.0x transformers LLaVA
    "generation": 0.9,  # cached generation within 10% of the bare decoder's tokens/s
    "data": 10.0,  # data pipeline >= 10x the training step's samples/s
}


# ==================================================================================== children
# Each child builds what it measures in a fresh process and returns a JSON-ready dict.

def _meta_model(resolved: Any) -> Any:
    """The recipe's model on the meta device: its tokenizer (with every added token), configs and
    widths, without reading or allocating weights."""
    return bc.build(resolved, meta=True)


class _TokensOnly:
    """OpenFlamingo calls ``vision_encoder(x)[1]`` for the patch tokens; this gives it vlmkit's
    encoder's tokens (the same module, so both models see identical features)."""

    def __init__(self, encoder: Any):
        import torch

        class Visual(torch.nn.Module):
            def __init__(self, inner: Any):
                super().__init__()
                self.inner = inner

            def forward(self, pixels: torch.Tensor) -> tuple[None, torch.Tensor]:
                return None, self.inner(pixels)

        self.visual = Visual(encoder)


def build_openflamingo(scale: str, resolved: Any, source: Any, encoder: Any = None) -> Any:
    """OpenFlamingo 2.0.1's ``Flamingo`` assembled as its factory does, offline, with the vlmkit
    recipe's decoder (config and, at demo scale, the same GGUF weights), token ids and dimensions.

    tiny: open_clip's tower of the same architecture (``visual(x)[1]``: the patch tokens).
    demo: the vlmkit timm encoder (EfficientNet-Lite0, last stage) behind ``visual(x)[1]``; the
    perceiver is rebuilt with the recipe's depth, latents and frame / media embeddings, since
    ``Flamingo`` builds it with OpenFlamingo's defaults."""
    import copy

    import torch
    from open_flamingo.src.flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.helpers import PerceiverResampler
    from open_flamingo.src.utils import extend_instance

    tok = source.decoder.tokenizer
    config = copy.deepcopy(source.decoder.model.config)
    conn = resolved.components["connector"].config
    fusion = resolved.components["fusion"].config
    for key, value in bc.OF_XATTN.items():
        if getattr(fusion, key) != value:
            raise SystemExit(f"OpenFlamingo's cross-attention blocks have {key}={value}; the recipe sets {getattr(fusion, key)}")
    torch.manual_seed(1)
    if scale == "tiny":
        import open_clip
        from transformers import AutoModelForCausalLM

        lang = AutoModelForCausalLM.from_config(config)
        base = open_clip.get_model_config("ViT-B-32")
        clip = open_clip.create_model(
            "ViT-B-32", pretrained=None, force_image_size=bc.TINY_OPEN_CLIP_VISION["image_size"],
            vision_cfg={**base["vision_cfg"], **bc.TINY_OPEN_CLIP_VISION},
            text_cfg={**base["text_cfg"], **bc.TINY_OPEN_CLIP_TEXT},
        )
        clip.visual.output_tokens = True
        vision, vis_dim = clip, bc.TINY_OPEN_CLIP_VISION["width"]
    else:
        from transformers import AutoModelForCausalLM

        gguf = Path(resolved.components["decoder"].config.gguf_file)
        lang = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        lang.resize_token_embeddings(len(tok), mean_resizing=False)
        if encoder is None:
            from vlmkit.core.registry import get_registry

            spec = resolved.components["encoder"]
            from vlmkit.core.interfaces import BuildContext

            encoder = get_registry().component_class("encoder", spec.name).build(spec.config, BuildContext())
        vision, vis_dim = _TokensOnly(encoder), encoder.width
    extend_instance(lang, FlamingoLMMixin)
    lang.set_decoder_layers_attr_name("model.layers")
    model = Flamingo(
        vision, lang, eoc_token_id=int(tok.convert_tokens_to_ids(bc.EOC)),
        media_token_id=int(tok.convert_tokens_to_ids(bc.IMAGE)), vis_dim=vis_dim,
        cross_attn_every_n_layers=fusion.every_n_layers,
    )
    wanted = {"depth": conn.depth, "num_latents": conn.num_latents, "heads": conn.heads, "dim_head": conn.dim_head,
              "ff_mult": conn.ff_mult, "max_num_media": conn.max_num_media, "max_num_frames": conn.max_num_frames}
    defaults = {**bc.OF_PERCEIVER, "max_num_media": None, "max_num_frames": None}  # what Flamingo builds
    if wanted != defaults:
        model.perceiver = PerceiverResampler(dim=vis_dim, **wanted)
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.to(bc.device())
    model.train()
    model.vision_encoder.eval()  # frozen: BatchNorm statistics stay, as vlmkit runs frozen parts in eval mode
    return model


def build_llava(source: Any) -> Any:
    """transformers' ``LlavaForConditionalGeneration`` with the same CLIP vision tower config, the
    same Llama config (vocabulary included) and the same ``<image>`` id as the tiny vlmkit prefix
    model; vision tower frozen (eval mode), projector and language model trainable."""
    import copy

    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = source.decoder.tokenizer
    vision = CLIPVisionConfig(**{k: v for k, v in bc.TINY_CLIP_VISION.items() if k != "model_type"})
    patches = (bc.TINY_CLIP_VISION["image_size"] // bc.TINY_CLIP_VISION["patch_size"]) ** 2
    config = LlavaConfig(
        vision_config=vision, text_config=copy.deepcopy(source.decoder.model.config),
        image_token_index=int(tok.convert_tokens_to_ids(bc.IMAGE)), image_seq_length=patches,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(1)
    model = LlavaForConditionalGeneration(config)
    for name, param in model.named_parameters():
        param.requires_grad_("vision_tower" not in name)
    model.to(bc.device())
    model.train()
    for name, module in model.named_modules():
        if name.endswith("vision_tower"):
            module.eval()
    return model


def _recipe(case: str, scale: str) -> Any:
    return bc.flamingo_recipe(scale) if case == "flamingo" else bc.prefix_recipe(scale)


def _reference_side(case: str, scale: str, resolved: Any, source: Any, batch: dict[str, Any],
                    encoder: Any = None) -> tuple[Any, Any]:
    """The reference model and its trainer on ``batch`` (the same tensors as vlmkit's)."""
    stage = resolved.recipe.stages[0]
    if case == "flamingo":
        model = build_openflamingo(scale, resolved, source, encoder)

        def loss() -> Any:
            return model(batch["vision_x"], batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
    else:
        model = build_llava(source)
        pixels = batch["vision_x"].flatten(0, 2)  # (B * T_img * F, C, H, W); every image is real

        def loss() -> Any:
            return model(input_ids=batch["input_ids"], pixel_values=pixels, attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
    return model, bc.ReferenceTrainer(list(model.parameters()), stage, loss)


def child_train(spec: dict[str, Any]) -> dict[str, Any]:
    """Training steps of ``spec['sides']`` (``vlmkit``, ``reference``) of comparison ``case`` at
    ``scale``. ``mode: time``: interleaved timed steps (and FLOPs per step with ``flops``);
    ``mode: memory``: one side, its peak memory over ``warmup + 1`` (at least 2) steps."""
    import torch

    case, scale, sides, mode = spec["case"], spec["scale"], spec["sides"], spec["mode"]
    build_start = time.perf_counter()
    resolved = _recipe(case, scale)
    # the vlmkit model, or (for a reference alone) the same model on the meta device: the tokenizer,
    # token ids and decoder config the reference is built with, and the inputs
    model = bc.build(resolved) if "vlmkit" in sides else _meta_model(resolved)
    batch = bc.to_device(bc.make_batch(model, bc.BATCH, bc.TEXT_TOKENS))  # the same tensors for both sides
    steps: dict[str, Any] = {}
    info: dict[str, Any] = {"case": case, "scale": scale, "mode": mode,
                            "input_ids": list(batch["input_ids"].shape), "vision_x": list(batch["vision_x"].shape)}
    encoder = None
    if "vlmkit" in sides:
        trainer = bc.VlmkitTrainer(model, resolved)
        steps["vlmkit"] = lambda: trainer.step(batch)
        info["vlmkit_trainable"] = bc.count_params(model.parameters())
        info["vlmkit_total"] = sum(p.numel() for p in model.parameters())
        encoder = model.encoder if case == "flamingo" and scale == "demo" else None
    if "reference" in sides:
        ref, ref_trainer = _reference_side(case, scale, resolved, model, batch, encoder)
        steps["reference"] = ref_trainer.step
        info["reference_trainable"] = bc.count_params(ref.parameters())
        info["reference_total"] = sum(p.numel() for p in ref.parameters())
    info["build_seconds"] = time.perf_counter() - build_start
    if mode == "memory":
        (name,) = steps
        meter = bc.PeakMemory()
        meter.start()
        for _ in range(max(2, spec["warmup"] + 1)):
            steps[name]()
        info["memory"] = {name: meter.stop()}
        return info
    warmup = spec["warmup"]
    if spec.get("flops"):  # counted on the first warm-up step of each side (the counter slows it down)
        info["flops"] = {name: bc.step_flops(fn) for name, fn in steps.items()}
        warmup = max(0, warmup - 1)
    times, losses = bc.time_interleaved(steps, spec["reps"], warmup)
    info["seconds"] = times
    info["loss"] = {k: float(v[-1]) if v else None for k, v in losses.items()}
    info["threads"] = torch.get_num_threads()
    return info


class _Generation:
    """One generation side: ``run()`` generates and returns the seconds after the prompt's forward
    (the cached decoding of the remaining ``new - 1`` tokens), found with a forward hook on the
    transformers model that ``generate`` steps."""

    def __init__(self, module: Any, call: Any):
        self.module = module
        self.call = call

    def run(self) -> float:
        marks: list[float] = []

        def hook(*_: Any) -> None:
            if not marks:
                bc.synchronize()
                marks.append(time.perf_counter())

        handle = self.module.register_forward_hook(hook)
        try:
            out = self.call()
            bc.synchronize()
            end = time.perf_counter()
        finally:
            handle.remove()
        if out.shape[-1] < GEN_NEW_TOKENS:
            raise RuntimeError(f"generation stopped after {out.shape[-1]} tokens")
        return end - marks[0]


def child_generation(spec: dict[str, Any]) -> dict[str, Any]:
    """Greedy cached generation of ``GEN_NEW_TOKENS`` tokens through vlmkit's prefix and
    cross-attention models and through the bare decoder (the prefix model's own transformers model,
    which no fusion hooks) on prompts of the same total lengths."""
    import torch

    scale = spec["scale"]
    build_start = time.perf_counter()
    prefix_resolved, flamingo_resolved = bc.prefix_recipe(scale), bc.flamingo_recipe(scale)
    models = {"prefix": bc.build(prefix_resolved).eval(), "gated_cross_attention": bc.build(flamingo_resolved).eval()}
    bare = models["prefix"].decoder.model
    tok = models["prefix"].decoder.tokenizer
    options = {"max_new_tokens": GEN_NEW_TOKENS, "min_new_tokens": GEN_NEW_TOKENS, "do_sample": False}
    info: dict[str, Any] = {"scale": scale, "new_tokens": GEN_NEW_TOKENS, "text_tokens": GEN_TEXT_TOKENS,
                            "build_seconds": time.perf_counter() - build_start, "runs": {}}
    for B in GEN_BATCHES:
        sides: dict[str, Any] = {}
        lengths: dict[str, int] = {}
        for fusion, model in models.items():
            batch = bc.to_device(bc.make_batch(model, B, GEN_TEXT_TOKENS, labels=False, seed=B))
            length = batch["input_ids"].shape[1]
            lengths[fusion] = length
            gen = _Generation(
                model.decoder.generation_module(),
                lambda m=model, b=batch: m.generate(b["input_ids"], b["attention_mask"], b["vision_x"], b["media_mask"],
                                                    **options),
            )
            ids = bc.text_ids(tok, (B, length), torch.Generator().manual_seed(100 + B)).to(bc.device())
            mask = torch.ones_like(ids)
            plain = _Generation(
                bare,
                lambda i=ids, a=mask: bare.generate(input_ids=i, attention_mask=a, pad_token_id=tok.pad_token_id,
                                                    eos_token_id=tok.eos_token_id, **options)[:, i.shape[1]:],
            )
            sides[fusion] = gen.run
            sides[f"bare@{fusion}"] = plain.run
        with torch.no_grad():
            times, decode = bc.time_interleaved(sides, spec["reps"], spec["warmup"])
        info["runs"][str(B)] = {"prompt_tokens": lengths, "seconds": times, "decode_seconds": decode}
    return info


def child_data(spec: dict[str, Any]) -> dict[str, Any]:
    """The ``otter_mimicit`` demo data of its ``instruct`` stage (images, in-context, video and
    caption entries, mixed by size) through the engine's pipeline: lazy image stores, chat template,
    ``StageBatchSampler``, ``Collator`` and a ``DataLoader`` with 0 and 2 workers; samples/s."""
    import torch
    from torch.utils.data import ConcatDataset, DataLoader

    from vlmkit.core.data.rendered import RenderedDataset
    from vlmkit.core.engine.sampler import StageBatchSampler
    from vlmkit.core.registry import get_registry

    build_start = time.perf_counter()
    mapping = bc.shipped_mapping("otter_mimicit")
    resolved = bc.load(mapping, "demo")
    model = _meta_model(resolved)  # tokenizer with the template's tokens, preprocessing, placeholders
    registry = get_registry()
    stage_index = next(i for i, s in enumerate(resolved.recipe.stages) if s.name == "instruct")
    stage = resolved.recipe.stages[stage_index]
    parts = [
        RenderedDataset(registry.component_class("dataset", resolved.datasets[a].name)(resolved.datasets[a].config),
                        model.templates.get(a), model.decoder.tokenizer, a)
        for a in stage.data
    ]
    info: dict[str, Any] = {"stage": stage.name, "data": list(stage.data), "batch_size": stage.batch_size,
                            "samples": [len(p) for p in parts], "batches_per_rep": DATA_BATCHES_PER_REP,
                            "build_seconds": time.perf_counter() - build_start, "workers": {}}
    for workers in spec.get("workers", (0, 2)):
        sampler = StageBatchSampler([len(p) for p in parts], stage.batch_size, seed=resolved.recipe.seed,
                                    stage_index=stage_index, names=list(stage.data))
        collator = model.collator(max_length=stage.max_length)
        loader = DataLoader(ConcatDataset(parts), batch_sampler=sampler, collate_fn=collator, num_workers=workers,
                            generator=torch.Generator())
        batches = iter(loader)
        start_iter = time.perf_counter()
        next(batches)  # the first batch: worker start-up (not timed as throughput)
        first = time.perf_counter() - start_iter

        def rep(batches: Any = batches) -> int:
            """Samples in the next DATA_BATCHES_PER_REP micro-batches."""
            return sum(len(next(batches)["ids"]) for _ in range(DATA_BATCHES_PER_REP))

        times, counted = bc.time_interleaved({"pipeline": rep}, spec["reps"], spec["warmup"])
        counts = counted["pipeline"]
        info["workers"][str(workers)] = {
            "first_batch_seconds": first, "seconds": times["pipeline"], "samples": counts,
            "samples_per_s": [n / t for n, t in zip(counts, times["pipeline"])],
        }
        del batches, loader
    return info


def child_matmul(spec: dict[str, Any]) -> dict[str, Any]:
    return bc.matmul_peak_gflops(spec["reps"], spec["warmup"])


def _throughput_recipe(on: bool) -> Any:
    """The shipped ``otter_mimicit`` demo profile (no evaluation), with the speed switches as
    shipped (``on``) or all off."""
    mapping = bc.shipped_mapping("otter_mimicit")
    mapping["name"] = f"bench_throughput_{'on' if on else 'off'}"
    mapping.pop("eval", None)
    for profile in mapping.get("profiles", {}).values():
        if isinstance(profile, dict):
            profile.pop("eval", None)
    run = mapping.setdefault("run", {})
    run["eval_before"] = False
    if not on:
        run.update(cache_features=False, length_groups=1)
    return bc.load(mapping, "demo")


def child_throughput(spec: dict[str, Any]) -> dict[str, Any]:
    """The otter demo's training step before and after the engine's speed work, in one process:
    ``off`` (no feature cache, whole micro-batches, ``new_tokens`` as whole tables with a masked
    gradient), ``on`` (the demo profile's switches and the row parameters; the cache warm: every
    image of the timed batches was encoded in the warm-up, as after the demo's first epoch) and
    ``on_cold`` (the same model and switches, the cache emptied before every step). Each side runs
    the first ``THROUGHPUT_BATCHES`` micro-batches of the demo's stages in their data order; both
    stages train the same parts, so one model per side takes both."""
    import copy

    import torch
    from torch.utils.data import ConcatDataset

    from vlmkit.core.data.collate import IGNORE, split_by_length
    from vlmkit.core.data.rendered import RenderedDataset
    from vlmkit.core.engine.sampler import StageBatchSampler, mix_options
    from vlmkit.core.registry import get_registry

    build_start = time.perf_counter()
    resolved = {"off": _throughput_recipe(False), "on": _throughput_recipe(True)}
    stages = resolved["on"].recipe.stages
    tunes = {s.tune.model_dump_json() for s in stages}
    if len(tunes) != 1:
        raise SystemExit("throughput: the otter demo's stages train different parts; the benchmark needs one model per stage")
    model_off = bc.build(resolved["off"])
    model_on = copy.deepcopy(model_off)  # the same weights, without reading the GGUF file twice
    registry = get_registry()
    batches: list[dict[str, Any]] = []
    for index, stage in enumerate(stages):
        parts = [RenderedDataset(registry.component_class("dataset", resolved["on"].datasets[a].name)(resolved["on"].datasets[a].config),
                                 model_on.templates.get(a), model_on.decoder.tokenizer, a) for a in stage.data]
        sampler = StageBatchSampler([len(p) for p in parts], stage.batch_size, seed=resolved["on"].recipe.seed,
                                    stage_index=index, **mix_options(stage, resolved["on"].recipe.data),
                                    names=list(stage.data))
        collator = model_on.collator(max_length=stage.max_length, frame_keys=True)
        data = ConcatDataset(parts)
        order = iter(sampler)
        batches += [collator([data[i] for i in next(order)]) for _ in range(THROUGHPUT_BATCHES.get(stage.name, 0))]
    batches = [bc.to_device(b) for b in batches]
    trained = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    stage_index = 1  # instruct: the longer stage (its schedule; both stages train the same parts)
    trainers = {
        "off": bc.VlmkitTrainer(model_off, resolved["off"], stage_index, new_token_rows=False),
        "on": bc.VlmkitTrainer(model_on, resolved["on"], stage_index, new_token_rows=True),
    }
    cache = trainers["on"].engine.feature_cache

    def steps(name: str, cold: bool = False) -> Any:
        def rep() -> float:
            loss = 0.0
            for b in batches:
                if cold:
                    cache.clear()
                loss = trainers[name].step(b)
            return loss
        return rep

    info: dict[str, Any] = {
        "batches": {s.name: THROUGHPUT_BATCHES.get(s.name, 0) for s in stages}, "batch_size": [s.batch_size for s in stages],
        "trained_tokens_per_rep": trained, "positions_per_rep": sum(b["input_ids"].numel() for b in batches),
        "positions_split_per_rep": sum(part["input_ids"].numel() for b in batches
                                       for part in split_by_length(b, resolved["on"].recipe.run.length_groups)),
        "real_tokens_per_rep": sum(int(b["attention_mask"].sum()) for b in batches),
        "frames_per_rep": sum(len(b["frame_keys"]) for b in batches),
        "distinct_frames": len({k for b in batches for k in b["frame_keys"]}),
        "switches_on": {"cache_features": resolved["on"].recipe.run.cache_features,
                        "length_groups": resolved["on"].recipe.run.length_groups, "new_token_rows": True},
        "build_seconds": time.perf_counter() - build_start,
    }
    passes_before = trainers["on"].passes
    times, losses = bc.time_interleaved({"off": steps("off"), "on": steps("on"), "on_cold": steps("on", cold=True)},
                                        spec["reps"], max(1, spec["warmup"]))
    info["seconds"] = times
    info["loss"] = {k: float(v[-1]) for k, v in losses.items()}
    runs = (spec["reps"] + max(1, spec["warmup"])) * 2  # on and on_cold step the same trainer
    info["passes_per_batch"] = (trainers["on"].passes - passes_before) / (runs * len(batches))
    info["feature_cache"] = cache.stats() if cache is not None else None
    info["optimizer_state_bytes"] = {k: t.optimizer_state_bytes() for k, t in trainers.items()}
    info["threads"] = torch.get_num_threads()
    return info


CHILDREN = {"train": child_train, "generation": child_generation, "data": child_data, "matmul": child_matmul,
            "throughput": child_throughput}


def run_child_main(spec_text: str, out_path: str) -> None:
    bc.quiet()
    spec = json.loads(spec_text)
    result = CHILDREN[spec["kind"]](spec)
    Path(out_path).write_text(json.dumps(result))


# ==================================================================================== parent
class Runner:
    """Starts children (one at a time), keeps their results for reuse within the run."""

    def __init__(self, reps: int, warmup: int):
        self.reps = reps
        self.warmup = warmup
        self.cache: dict[str, dict[str, Any]] = {}
        self.wall: dict[str, float] = {}

    def __call__(self, label: str, **spec: Any) -> dict[str, Any]:
        spec = {"reps": self.reps, "warmup": self.warmup, **spec}
        key = json.dumps(spec, sort_keys=True)
        if key in self.cache:
            return self.cache[key]
        print(f"  {label} ...", flush=True)
        start = time.perf_counter()
        env = {**os.environ, "TQDM_DISABLE": "1"}  # no progress bars (GGUF de-quantisation) from the children
        if spec.get("mode") == "memory":
            # a fixed mmap threshold: glibc returns every freed large block to the system at once, so the
            # resident size follows the live tensors (and freed build buffers are not silently reused)
            env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
        with tempfile.TemporaryDirectory(prefix="vlmkit-speed-") as tmp:
            out = Path(tmp) / "result.json"
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", key, "--child-out", str(out)],
                                  cwd=str(bc.REPO), env=env)
            if proc.returncode != 0 or not out.is_file():
                raise SystemExit(f"\nbenchmark child '{label}' failed (exit code {proc.returncode}); spec {key}")
            result = json.loads(out.read_text())
        elapsed = time.perf_counter() - start
        self.wall[label] = round(elapsed, 1)
        print(f"    {elapsed:.1f} s", flush=True)
        self.cache[key] = result
        return result

    def train_time(self, case: str, scale: str, sides: tuple[str, ...], flops: bool = True) -> dict[str, Any]:
        """Timing of the sides together; a run that timed more sides serves a request for fewer."""
        for key, result in self.cache.items():
            spec = json.loads(key)
            if (spec.get("kind") == "train" and spec["case"] == case and spec["scale"] == scale
                    and spec["mode"] == "time" and set(sides) <= set(spec["sides"]) and (spec.get("flops") or not flops)):
                return result
        label = f"{case} {scale}: time {' + '.join(sides)}"
        return self(label, kind="train", case=case, scale=scale, sides=list(sides), mode="time", flops=flops)

    def train_memory(self, case: str, scale: str, side: str) -> dict[str, Any]:
        return self(f"{case} {scale}: peak memory of {side}", kind="train", case=case, scale=scale,
                    sides=[side], mode="memory")


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _steps_per_s(seconds: list[float]) -> float:
    return 1.0 / bc.median(seconds)


def bench_training(run: Runner, case: str, scale: str) -> dict[str, Any]:
    """Comparison 1 (``flamingo``) or 2 (``prefix``) at ``scale``."""
    timing = run.train_time(case, scale, ("vlmkit", "reference"))
    memory = {side: run.train_memory(case, scale, side)["memory"][side] for side in ("vlmkit", "reference")}
    ours, ref = (_steps_per_s(timing["seconds"][s]) for s in ("vlmkit", "reference"))
    per_rep = [r / v for v, r in zip(timing["seconds"]["vlmkit"], timing["seconds"]["reference"])]
    speed_target = TARGETS["train_speed" if case == "flamingo" else "prefix_speed"]
    mem_ratio = _ratio(memory["vlmkit"]["delta_mib"], memory["reference"]["delta_mib"])
    rows = [
        {"scale": scale, "metric": "training steps/s", "vlmkit": ours, "reference": ref, "ratio": _ratio(ours, ref),
         "target": f">= {speed_target:.1f}x", "met": _ratio(ours, ref) >= speed_target,
         "ratio_per_rep": per_rep},
        {"scale": scale, "metric": "peak memory of the steps (MiB above the built model)",
         "vlmkit": memory["vlmkit"]["delta_mib"], "reference": memory["reference"]["delta_mib"], "ratio": mem_ratio,
         "target": "<= 1.0x" if case == "flamingo" else None,
         "met": (mem_ratio <= TARGETS["train_memory"]) if case == "flamingo" else None},
        {"scale": scale, "metric": "peak resident memory of the process (MiB)",
         "vlmkit": memory["vlmkit"]["peak_mib"], "reference": memory["reference"]["peak_mib"],
         "ratio": _ratio(memory["vlmkit"]["peak_mib"], memory["reference"]["peak_mib"]), "target": None, "met": None},
    ]
    if "flops" in timing:
        f = timing["flops"]
        rows.append({"scale": scale, "metric": "GFLOP per step (FlopCounterMode)", "vlmkit": f["vlmkit"] / 1e9,
                     "reference": f["reference"] / 1e9, "ratio": _ratio(f["vlmkit"], f["reference"]),
                     "target": None, "met": None})
    return {"rows": rows, "raw": {"timing": timing, "memory": memory}}


def bench_generation(run: Runner, scale: str) -> dict[str, Any]:
    """Comparison 3 at ``scale``."""
    result = run(f"generation {scale}", kind="generation", scale=scale)
    rows = []
    for B, data in result["runs"].items():
        b = int(B)
        for fusion in ("prefix", "gated_cross_attention"):
            ours_total = b * GEN_NEW_TOKENS / bc.median(data["seconds"][fusion])
            bare_total = b * GEN_NEW_TOKENS / bc.median(data["seconds"][f"bare@{fusion}"])
            ours_dec = b * (GEN_NEW_TOKENS - 1) / bc.median(data["decode_seconds"][fusion])
            bare_dec = b * (GEN_NEW_TOKENS - 1) / bc.median(data["decode_seconds"][f"bare@{fusion}"])
            length = data["prompt_tokens"][fusion]
            rows.append({"scale": scale, "metric": f"{fusion}, batch {b}, prompt {length}: decoding tokens/s",
                         "vlmkit": ours_dec, "reference": bare_dec, "ratio": _ratio(ours_dec, bare_dec),
                         "target": f">= {TARGETS['generation']:.2f}x", "met": _ratio(ours_dec, bare_dec) >= TARGETS["generation"]})
            rows.append({"scale": scale, "metric": f"{fusion}, batch {b}, prompt {length}: end-to-end tokens/s",
                         "vlmkit": ours_total, "reference": bare_total, "ratio": _ratio(ours_total, bare_total),
                         "target": None, "met": None})
    return {"rows": rows, "raw": result}


def _otter_rate(run: Runner, scales: list[str]) -> tuple[str, float, dict[str, Any]]:
    """The Flamingo (otter) training step's samples/s at the largest selected scale."""
    scale = "demo" if "demo" in scales else "tiny"
    timing = run.train_time("flamingo", scale, ("vlmkit",))
    return scale, bc.BATCH / bc.median(timing["seconds"]["vlmkit"]), timing


def bench_data(run: Runner, scales: list[str]) -> dict[str, Any]:
    """Comparison 4."""
    result = run("data pipeline (otter_mimicit demo data)", kind="data", workers=[0, 2])
    scale, train_rate, _ = _otter_rate(run, scales)
    rows = []
    for workers, data in result["workers"].items():
        rate = bc.median(data["samples_per_s"])
        rows.append({"scale": scale, "metric": f"samples/s, num_workers {workers} vs the {scale} otter training step",
                     "vlmkit": rate, "reference": train_rate, "ratio": _ratio(rate, train_rate),
                     "target": f">= {TARGETS['data']:.0f}x", "met": _ratio(rate, train_rate) >= TARGETS["data"]})
    return {"rows": rows, "raw": {"pipeline": result, "training_samples_per_s": train_rate, "training_scale": scale}}


def bench_mfu(run: Runner, scales: list[str]) -> dict[str, Any]:
    """Comparison 5: model FLOP utilisation of the otter and prefix training steps."""
    peak = run("fp32 matmul peak", kind="matmul")
    rows, raw = [], {"matmul": peak}
    for scale in (s for s in bc.SCALES if s in scales):
        for case, name in (("flamingo", "otter (gated cross-attention)"), ("prefix", "prefix (LLaVA-style)")):
            timing = run.train_time(case, scale, ("vlmkit",), flops=True)
            flops = timing["flops"]["vlmkit"]
            achieved = flops * _steps_per_s(timing["seconds"]["vlmkit"]) / 1e9
            rows.append({"scale": scale, "metric": f"{name} step: {flops / 1e9:.1f} GFLOP, achieved GFLOP/s vs matmul peak",
                         "vlmkit": achieved, "reference": peak["gflops"], "ratio": _ratio(achieved, peak["gflops"]),
                         "target": None, "met": None})
            raw[f"{case}_{scale}"] = {"flops": flops, "seconds": timing["seconds"]["vlmkit"]}
    return {"rows": rows, "raw": raw}


def bench_throughput(run: Runner) -> dict[str, Any]:
    """Comparison 6: the otter demo step with the engine's speed switches on vs off."""
    result = run("throughput: otter demo step, speed switches on vs off", kind="throughput")
    tokens = result["trained_tokens_per_rep"]
    n = sum(result["batches"].values())
    rate = {side: tokens / bc.median(result["seconds"][side]) for side in ("off", "on", "on_cold")}
    steps = {side: n / bc.median(result["seconds"][side]) for side in ("off", "on", "on_cold")}
    mib = {k: v / 2**20 for k, v in result["optimizer_state_bytes"].items()}
    rows = [
        {"scale": "demo", "metric": "trained tokens/s, switches on (cache warm) vs off", "vlmkit": rate["on"],
         "reference": rate["off"], "ratio": _ratio(rate["on"], rate["off"]), "target": None, "met": None},
        {"scale": "demo", "metric": "trained tokens/s, switches on with the cache emptied before every step vs off",
         "vlmkit": rate["on_cold"], "reference": rate["off"], "ratio": _ratio(rate["on_cold"], rate["off"]),
         "target": None, "met": None},
        {"scale": "demo", "metric": "steps/s (batches of 8), switches on (cache warm) vs off", "vlmkit": steps["on"],
         "reference": steps["off"], "ratio": _ratio(steps["on"], steps["off"]), "target": None, "met": None},
        {"scale": "demo", "metric": "AdamW state of the trained parameters (MiB)", "vlmkit": mib["on"],
         "reference": mib["off"], "ratio": _ratio(mib["on"], mib["off"]), "target": None, "met": None},
        {"scale": "demo", "metric": f"token positions per repetition ({result['real_tokens_per_rep']} real, the rest "
         "padding), length groups vs whole micro-batches", "vlmkit": float(result["positions_split_per_rep"]),
         "reference": float(result["positions_per_rep"]),
         "ratio": _ratio(result["positions_split_per_rep"], result["positions_per_rep"]), "target": None, "met": None},
    ]
    return {"rows": rows, "raw": result}


# ==================================================================================== report
TITLES = {
    "flamingo": ("1. Flamingo-style training step: vlmkit vs OpenFlamingo 2.0.1 `Flamingo`", "OpenFlamingo"),
    "prefix": ("2. Prefix (LLaVA-style) training step: vlmkit vs transformers `LlavaForConditionalGeneration`", "transformers LLaVA"),
    "generation": ("3. Cached greedy generation: vlmkit fusions vs the bare decoder's `generate`", "bare decoder"),
    "data": ("4. Data pipeline: otter_mimicit demo data vs the otter training step", "training step"),
    "mfu": ("5. Model FLOP utilisation: training steps vs this machine's fp32 matmul rate", "matmul peak"),
    "throughput": ("6. The otter demo step: the engine's speed switches on vs off", "switches off"),
}

NOTES = {
    "flamingo": (
        "Encoder frozen, perceiver + gated cross-attention trainable, decoder frozen; forward, backward, clipping at "
        f"1.0, AdamW. Batch {bc.BATCH}, {bc.IMAGES_PER_SAMPLE} images per sample (1 `<image>` marker each), "
        f"{bc.TEXT_TOKENS} text tokens. tiny: open_clip ViT "
        "(56 px, 49 tokens of width 128), OpenFlamingo's perceiver (64 latents, 6 layers) and blocks (8 heads x 64) "
        "every 2 layers of a 4-layer Llama of width 256. demo: the `otter_mimicit` demo model (EfficientNet-Lite0 "
        "last stage, 49 x 320; perceiver 16 latents x 2 layers; blocks every 3 layers of SmolLM2-135M), OpenFlamingo "
        "given the same encoder module, the same GGUF decoder weights and a perceiver of the same dimensions. "
        "Memory: each side alone in a fresh process (glibc's mmap threshold fixed at 128 KiB so that freed tensors "
        "leave the resident set), the resident high-water mark over its steps (optimizer state included) above "
        "the resident size before them; on a GPU, `torch.cuda.max_memory_allocated` above the allocated size."
    ),
    "prefix": (
        "Encoder frozen, mlp2x_gelu projector + decoder trainable. CLIP vision tower (56 px, patch 8, width 128, "
        f"3 layers, penultimate layer, CLS dropped), the tiny Llama; batch {bc.BATCH}, {bc.IMAGES_PER_SAMPLE} images x 49 "
        f"`<image>` tokens + {bc.TEXT_TOKENS} text tokens per sample."
    ),
    "generation": (
        f"Greedy, {GEN_NEW_TOKENS} new tokens (min = max), KV cache; prompts of 2 images and {GEN_TEXT_TOKENS} text "
        "tokens; the bare decoder (the same transformers model, no fusion) generates from a text prompt of the same "
        "total length. Decoding tokens/s counts the tokens after the prompt's forward pass (the cached steps); "
        "end-to-end includes the prompt (and, for vlmkit, encoding the images). The target applies to decoding."
    ),
    "data": (
        "The `instruct` stage's data entries of `otter_mimicit` (images, in-context, video, captions; mixed by "
        "size) as the engine reads them: parquet image store, otter template, StageBatchSampler, Collator "
        f"(224 px), DataLoader; {DATA_BATCHES_PER_REP} micro-batches of 8 per repetition. The training rate is the "
        f"otter training step's samples/s from comparison 1 (batch {bc.BATCH})."
    ),
    "mfu": (
        "FLOPs of one training step counted by `torch.utils.flop_counter.FlopCounterMode` (forward and backward "
        "matmuls, convolutions and attention) times the measured steps/s, against the median GFLOP/s of 2048 x 2048 "
        "fp32 `torch.matmul`. The steps are those of comparisons 1 and 2 (prefix at demo scale: the `llava` demo model)."
    ),
    "throughput": (
        "The `otter_mimicit` demo model and tune modes (perceiver, cross-attention and the new tokens' embedding rows "
        f"train), on real demo batches: the first {' and '.join(f'{n} of stage {s}' for s, n in THROUGHPUT_BATCHES.items())} "
        "(batch 8, data order) per repetition; trained tokens are the answer tokens the loss covers. *On*: "
        "`run.cache_features` and `run.length_groups` as the demo profile sets them, and `embeddings: new_tokens` as row "
        "parameters; the cache is warm (the warm-up encoded every image of the timed batches, as after the demo's first "
        "epoch). *Off*: every image encoded at every step, whole micro-batches, the whole embedding table trainable with a "
        "masked gradient (vlmkit before these switches). *Cache emptied*: on, but every image encoded again at every step."
    ),
}


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def write_report(out: Path, machine: dict[str, Any], settings: dict[str, Any], sections: dict[str, Any]) -> None:
    lines = [
        "# vlmkit speed benchmarks",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch threads), "
        f"device {machine['device']}{' (' + machine['gpu'] + ')' if 'gpu' in machine else ''}; "
        f"torch {machine['torch']}, transformers {machine.get('transformers', '?')}, Python {machine['python']}; "
        f"{machine['date']}.",
        "",
        f"`python benchmarks/speed.py {settings['argv']}`: each figure is the median of {settings['reps']} timed "
        f"repetitions after {settings['warmup']} warm-up; the ratio is vlmkit / reference, both measured in one "
        f"process on the same inputs. Wall time of the whole run: {settings.get('wall_seconds', 0):.0f} s. "
        "Raw repetitions: the `.json` file beside this one.",
        "",
    ]
    for name in COMPARISONS:
        if name not in sections:
            continue
        title, ref = TITLES[name]
        lines += [f"## {title}", "", NOTES[name], ""]
        lines += [f"| scale | figure | vlmkit | {ref} | ratio | target | met |", "|---|---|---|---|---|---|---|"]
        for row in sections[name]["rows"]:
            lines.append(
                f"| {row['scale']} | {row['metric']} | {_fmt(row['vlmkit'])} | {_fmt(row['reference'])} | "
                f"{_fmt(row['ratio'])} | {row['target'] or '—'} | {_fmt(row['met'])} |"
            )
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    payload = {"machine": machine, "settings": settings, "targets": TARGETS, "comparisons": sections}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per figure (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    parser.add_argument("--only", default=",".join(COMPARISONS), help=f"comma-separated subset of {', '.join(COMPARISONS)}")
    parser.add_argument("--scales", default=",".join(bc.SCALES), help="comma-separated subset of tiny, demo")
    parser.add_argument("--out", default=str(HERE / "results"), help="writes OUT.md and OUT.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child_main(args.child, args.child_out)
        return
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    scales = [s.strip() for s in args.scales.split(",") if s.strip()]
    bad = [s for s in only if s not in COMPARISONS] + [s for s in scales if s not in bc.SCALES]
    if bad or args.reps < 1 or args.warmup < 0:
        parser.error(f"unknown names {bad}; --only takes {', '.join(COMPARISONS)}, --scales takes tiny, demo; "
                     "--reps >= 1, --warmup >= 0")
    out = Path(args.out)
    if out.suffix in (".md", ".json"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    machine = bc.machine_info()
    print(f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {machine['device']}, {machine['date']}")
    run = Runner(args.reps, args.warmup)
    settings = {"reps": args.reps, "warmup": args.warmup, "only": only, "scales": scales,
                "argv": " ".join(sys.argv[1:] if argv is None else argv) or "(defaults)"}
    sections: dict[str, Any] = {}

    def section(name: str, fn: Any) -> None:
        print(f"{name}:", flush=True)
        sections[name] = fn()
        settings["wall_seconds"] = time.perf_counter() - start
        settings["child_wall_seconds"] = run.wall
        write_report(out, machine, settings, sections)

    ordered = [s for s in bc.SCALES if s in scales]
    if "flamingo" in only:
        section("flamingo", lambda: _merge(bench_training(run, "flamingo", s) for s in ordered))
    if "prefix" in only and "tiny" in scales:
        section("prefix", lambda: _merge([bench_training(run, "prefix", "tiny")]))
    if "generation" in only:
        section("generation", lambda: _merge(bench_generation(run, s) for s in ordered))
    if "data" in only:
        section("data", lambda: bench_data(run, scales))
    if "mfu" in only:
        section("mfu", lambda: bench_mfu(run, scales))
    if "throughput" in only and "demo" in scales:
        section("throughput", lambda: bench_throughput(run))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')} in {time.perf_counter() - start:.0f} s")


def _merge(parts: Any) -> dict[str, Any]:
    rows, raw = [], []
    for part in parts:
        rows += part["rows"]
        raw.append(part["raw"])
    return {"rows": rows, "raw": raw}


if __name__ == "__main__":
    main()
