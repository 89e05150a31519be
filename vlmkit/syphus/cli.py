"""``recipes data generate``, ``recipes data annotate-demo`` and ``recipes data tasks``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from vlmkit.core.errors import VlmkitError

__all__ = ["add_data_commands", "DATA_COMMANDS", "build_backend", "backend_config"]


def add_data_commands(data_sub: Any, common: argparse.ArgumentParser) -> None:
    p = data_sub.add_parser("generate", parents=[common],
                            help="generate MIMIC-IT instruction data from visual annotations with an LLM (Syphus)")
    p.add_argument("task", help="a shipped task (recipes data tasks) or a task YAML file")
    p.add_argument("--annotations", type=Path, required=True,
                   help="JSONL of {id, media: [paths], captions, boxes: [[label, x0, y0, x1, y1]], timestamps?}")
    p.add_argument("--backend", default="transformers", help="a registered llm_backend (default transformers)")
    p.add_argument("--backend-config", type=Path, metavar="YAML", help="the backend's options as a YAML mapping")
    p.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                   help="one backend option (value read as YAML), e.g. batch_size=16 (repeatable; wins over the file)")
    p.add_argument("--config", type=Path, metavar="YAML", help="filters, linking and image size (a YAML mapping)")
    p.add_argument("--out", type=Path, required=True, help="output folder (new, empty, or an earlier output)")
    p.add_argument("--languages", default="",
                   help="comma-separated translations to add: zh,ja,es,de,fr,ko,ar or 'all' (default: none)")
    p.add_argument("--cache", type=Path, help="LLM call cache folder (default: <out>/cache)")
    p.add_argument("--limit", type=int, help="only the first N annotation items")
    p.add_argument("--dry-run", action="store_true",
                   help="write the rendered prompts and the rejected annotation lines; check the backend's name "
                        "and options, but load and call nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p = data_sub.add_parser("annotate-demo", parents=[common],
                            help="annotations (JSONL and images) of the demo scenes and clips, input for generate")
    p.add_argument("--out", type=Path, required=True, help="folder for annotations.jsonl and media/")
    p.add_argument("--demo", type=Path, help="a demo data folder (default: the cached demo data of --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=("train", "eval", "all"))
    data_sub.add_parser("tasks", parents=[common], help="the shipped generation tasks")


def _yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise VlmkitError(f"{what} {path}: cannot be read as YAML: {exc}") from None
    if not isinstance(data, dict):
        raise VlmkitError(f"{what} {path}: expected a mapping")
    return data


def backend_config(name: str, options: dict[str, Any], registry: Any = None) -> tuple[type, Any]:
    """The backend class and its validated config, without building it (no model loaded, no key read)."""
    from pydantic import ValidationError

    from vlmkit.core.registry import get_registry
    from vlmkit.syphus.annotations import pydantic_problems

    registry = registry or get_registry()
    cls = registry.component_class("llm_backend", name)
    try:
        return cls, cls.Config.model_validate(options)
    except ValidationError as exc:
        raise VlmkitError(f"backend {name}: {pydantic_problems(exc)}") from None


def build_backend(name: str, options: dict[str, Any], registry: Any = None) -> Any:
    cls, config = backend_config(name, options, registry)
    return cls(config)


def cmd_generate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from vlmkit.syphus.annotations import pydantic_problems
    from vlmkit.syphus.pipeline import GenerateConfig, generate
    from vlmkit.syphus.task import load_task
    from vlmkit.syphus.translate import LANGUAGES

    task = load_task(args.task)
    options = _yaml_mapping(args.backend_config, "--backend-config") if args.backend_config else {}
    for item in args.backend_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise VlmkitError(f"--backend-option: '{item}' is not KEY=VALUE")
        options[key] = yaml.safe_load(value)
    try:
        config = GenerateConfig.model_validate(_yaml_mapping(args.config, "--config") if args.config else {})
    except ValidationError as exc:
        raise VlmkitError(f"--config {args.config}: {pydantic_problems(exc)}") from None
    languages = list(LANGUAGES) if args.languages == "all" else [x.strip() for x in args.languages.split(",") if x.strip()]
    if args.limit is not None and args.limit < 1:
        raise VlmkitError(f"--limit: must be at least 1, got {args.limit}")
    if args.dry_run:   # the backend's name and options are still checked: a dry run vets the real command
        backend_config(args.backend, options)
    backend = None if args.dry_run else build_backend(args.backend, options)
    try:
        result = generate(task, args.annotations, args.out, backend, config=config, languages=languages,
                          limit=args.limit, dry_run=args.dry_run, cache_dir=args.cache, progress=not args.no_progress)
    finally:
        if backend is not None:
            backend.close()
    if result.dry_run:
        print(f"dry run: {result.items} prompts written to {args.out / result.files[0]}; nothing was called")
    else:
        rate = result.parsed_items / result.items if result.items else 0.0
        print(f"{task.name}: {result.items} items, {result.parsed_items} answers parsed ({rate:.0%}), "
              f"{result.pairs} pairs kept; {result.calls} LLM calls, {result.cached} from the cache; "
              f"{result.prompt_tokens} prompt + {result.completion_tokens} completion tokens; {result.seconds:.0f} s")
        for lang, n in result.translations.items():
            print(f"  {lang}: {n} translated pairs")
    if result.rejects:
        print("rejected (kept in " + f"{task.prefix}_rejects.jsonl): "
              + ", ".join(f"{k} {v}" for k, v in result.rejects.items()))
    print(f"files in {args.out}: {', '.join(result.files)}")
    return 0


def cmd_annotate_demo(args: argparse.Namespace) -> int:
    from vlmkit.demo import data as demo
    from vlmkit.syphus.demo_annotations import write_demo_annotations

    source = args.demo if args.demo is not None else demo.demo_data_dir(args.seed)
    counts = write_demo_annotations(source, args.out, args.split)
    print(f"{args.out / 'annotations.jsonl'}: {counts['items']} items ({counts['scenes']} scenes, {counts['clips']} "
          f"clips with {counts['frames']} frames) from {source}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from vlmkit.syphus.task import load_task, shipped_tasks

    for name in shipped_tasks():
        task = load_task(name)
        print(f"{name:<26} {task.prefix:<7} {task.group:<11} {task.description}")
    return 0


DATA_COMMANDS = {"generate": cmd_generate, "annotate-demo": cmd_annotate_demo, "tasks": cmd_tasks}
