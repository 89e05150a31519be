"""The ``recipes`` command line.

User mistakes (a bad recipe, an unknown name, a broken plug-in in strict mode) end with a
one-paragraph message on stderr and exit code 2; ``--debug`` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

from vlmkit.core.errors import VlmkitError
from vlmkit.core.hookspecs import KINDS


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: the sub-command's copy of these options must not reset one given before the command
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    common.add_argument("--strict-plugins", action="store_true", default=argparse.SUPPRESS,
                        help="a plug-in that fails to load is an error")

    parser = argparse.ArgumentParser(
        prog="recipes",
        description="Compose, validate and train multimodal LLMs from recipe YAML files.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def recipe_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--profile", help="a profile of the recipe (default: its default_profile)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                       help="override a field, e.g. --set model.connector.projector=mlp3x_gelu (repeatable)")

    def trust_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--trust-remote-code", action="store_true",
                       help="allow the Python code that the export's model folders ship (its recipe's "
                            "trust_remote_code: true) to run; without it such an export is refused. An export's own "
                            "trust_remote_code setting is never enough: read that code before you pass this")

    sub.add_parser("list", parents=[common], help="the shipped recipes")
    p = sub.add_parser("show", parents=[common], help="print a recipe resolved (extends, profile, overrides)")
    p.add_argument("recipe", help="shipped recipe name or YAML file")
    recipe_args(p)
    p = sub.add_parser("validate", parents=[common],
                       help="check a recipe and each of its profiles (or only --profile), with any --set")
    p.add_argument("recipe", help="shipped recipe name or YAML file")
    recipe_args(p)
    p = sub.add_parser("components", parents=[common], help="registered components")
    p.add_argument("kind", nargs="?", choices=KINDS)
    p = sub.add_parser("plugins", parents=[common], help="plug-ins with their distributions and components")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("schema", parents=[common], help="the recipe JSON Schema (for editor completion)")
    p = sub.add_parser("params", parents=[common],
                       help="trainable and frozen parameters per stage and component (meta device: no weights read)")
    p.add_argument("recipe", help="shipped recipe name or YAML file")
    recipe_args(p)
    p = sub.add_parser("run", parents=[common], help="train a recipe")
    p.add_argument("recipe", help="shipped recipe name or YAML file")
    recipe_args(p)
    p.add_argument("--output-dir", type=Path,
                   help="run folder (default: runs/<recipe name>); a new or empty folder, or a vlmkit run folder "
                        "(it holds a .vlmkit-run file): any other folder is refused unless --overwrite is given")
    p.add_argument("--overwrite", action="store_true",
                   help="run in an --output-dir that is not empty and is not a vlmkit run folder. Nothing there is "
                        "deleted or changed: files and folders at the paths a run writes (recipe.yaml, metrics.jsonl, "
                        "loss.png, tensorboard/, checkpoints/, export/, eval/) are first renamed to "
                        "<name>.pre-vlmkit-<time>; every other file is left alone. No effect on a run folder")
    p.add_argument("--resume", action="store_true",
                   help="resume the folder's checkpoints even if the recipe changed (a folder with checkpoints of "
                        "the same recipe is resumed without it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p = sub.add_parser("eval", parents=[common], help="evaluate a trained model (run folder or export)")
    p.add_argument("model", help="a run folder (its export/ is used) or an export folder")
    p.add_argument("--data", action="append", default=[], metavar="NAME",
                   help="evaluate held-out instructions on this entry of the recipe's data section instead of "
                        "running the recipe's eval list (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="change the recipe's data or eval sections, e.g. --set data.eval.instructions=my.json")
    p.add_argument("--label", default="eval", help="name of this evaluation (results in <run>/eval/<label>/)")
    p.add_argument("--output-dir", type=Path, help="where to write eval/<label>/ (default: the run folder)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    trust_arg(p)
    p = sub.add_parser("chat", parents=[common], help="ask a trained model about an image, in the terminal")
    p.add_argument("model", help="a run folder (its export/ is used) or an export folder")
    p.add_argument("--image", help="the image the questions are about")
    p.add_argument("--example", nargs=3, action="append", default=[], metavar=("IMAGE", "QUESTION", "ANSWER"),
                   help="an in-context example shown before the question (repeatable, oldest first)")
    p.add_argument("--question", action="append", default=[],
                   help="ask this and exit instead of reading questions from the terminal (repeatable: follow-ups)")
    p.add_argument("--template", help="which of the recipe's chat templates (default: the last stage's)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    trust_arg(p)
    p = sub.add_parser("serve", parents=[common],
                       help="a web chat and an OpenAI-compatible API (/v1/chat/completions) for a trained model")
    p.add_argument("model", help="a run folder (its export/ is used) or an export folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--template", help="which of the recipe's chat templates (default: the last stage's)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--max-queue", type=int, default=8,
                   help="requests that may wait while one is answered; more get a busy answer (default 8)")
    p.add_argument("--max-images", type=int, default=8, help="images per request (default 8)")
    p.add_argument("--max-image-mb", type=float, default=10.0, help="size of one encoded image in MiB (default 10)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="the most new tokens a request may ask for")
    p.add_argument("--allow-no-image", action="store_true", help="accept questions without any image")
    trust_arg(p)
    p = sub.add_parser("data", parents=[common], help="data sets: the demo data, and instruction data generated by an LLM")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    p = data_sub.add_parser("demo", parents=[common],
                            help="write the generated demo data (MIMIC-IT, captions, held-out split)")
    p.add_argument("--out", type=Path, help="folder to write (default: the per-user cache, written once)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical files (default 0)")
    p.add_argument("--size", default="small", choices=("tiny", "small", "medium"), help="how much (default small)")
    p = data_sub.add_parser("concepts", parents=[common],
                            help="write the synthetic ISEKAI-like concepts (LCL training classes, held-out novel concepts)")
    p.add_argument("--out", type=Path, help="folder to write (default: the per-user cache, written once: ${lcl_data})")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical files (default 0)")
    from vlmkit.syphus.cli import add_data_commands

    add_data_commands(data_sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.debug = getattr(args, "debug", False)
    args.strict_plugins = getattr(args, "strict_plugins", False)
    warnings.showwarning = _show_warning
    try:
        return COMMANDS[args.command](args) or 0
    except VlmkitError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    print(f"warning: {message}", file=sys.stderr)


def _registry(args: argparse.Namespace):
    """The registry for this command: ``--strict-plugins`` is passed on explicitly (without it the
    environment's ``VLMKIT_STRICT_PLUGINS`` decides)."""
    from vlmkit.core.registry import get_registry

    return get_registry(strict=True if args.strict_plugins else None)


def cmd_list(args: argparse.Namespace) -> int:
    from vlmkit.core.recipe.loader import shipped_recipes
    from vlmkit.core.recipe.yaml_io import read_yaml_mapping

    for name, path in shipped_recipes().items():
        data = read_yaml_mapping(path)
        profiles = ", ".join(data.get("profiles", {}) or {}) or "-"
        print(f"{name:<24} {data.get('description', '')}  [profiles: {profiles}]")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from vlmkit.core.recipe.loader import load_recipe

    resolved = load_recipe(args.recipe, args.profile, args.overrides, registry=_registry(args))
    sys.stdout.write(resolved.to_yaml())
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from vlmkit.core.recipe.loader import validate_all_profiles

    path, checked = validate_all_profiles(args.recipe, registry=_registry(args), profile=args.profile, overrides=args.overrides)
    print(f"ok: {path} ({', '.join(checked)})")
    return 0


def cmd_components(args: argparse.Namespace) -> int:
    registry = _registry(args)
    kinds = [args.kind] if args.kind else list(KINDS)
    for kind in kinds:
        print(f"{kind}s:")
        for name in registry.names(kind):
            entry = registry.components[kind][name]
            print(f"  {name:<20} {entry.summary}  [{entry.provider.describe()}]")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    registry = _registry(args)
    report = registry.plugin_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for plugin in report:
        dist = f"{plugin['distribution']} {plugin['version'] or ''}".strip() if plugin["distribution"] else "-"
        line = f"{plugin['name']:<24} {dist:<32} {plugin['status']}"
        if plugin["error"]:
            line += f": {plugin['error']}"
        print(line)
        for comp in plugin["components"]:
            print(f"    {comp['kind']:<10} {comp['name']}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from vlmkit.core.recipe.json_schema import recipe_json_schema

    print(json.dumps(recipe_json_schema(_registry(args)), indent=2))
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from vlmkit.core.params import format_report, stage_parameters
    from vlmkit.core.recipe.loader import load_recipe

    registry = _registry(args)
    resolved = load_recipe(args.recipe, args.profile, args.overrides, registry=registry)
    print(format_report(resolved.recipe.name, resolved.profile, stage_parameters(resolved, registry)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from vlmkit.core.engine import run
    from vlmkit.core.recipe.loader import load_recipe

    registry = _registry(args)
    resolved = load_recipe(args.recipe, args.profile, args.overrides, registry=registry)
    output_dir = args.output_dir or Path("runs") / resolved.recipe.name
    result = run(resolved, output_dir, registry=registry, progress=not args.no_progress,
                 resume=True if args.resume else None, overwrite=args.overwrite)
    if result.processes > 1 and not _is_main_process():
        return 0
    if not result.complete_before:
        print(f"trained on {result.processes} process{'es' if result.processes > 1 else ''} ({result.device})")
    if result.complete_before:
        print(f"{output_dir} already holds the finished run; nothing to train")
    for stage in result.stages:
        if stage.losses:
            print(f"stage {stage.name}: {stage.steps} steps, loss {stage.losses[0]:.4f} -> {stage.losses[-1]:.4f}")
    print(f"run folder: {result.output_dir} (metrics.jsonl, loss.png, checkpoints/"
          + (", export/" if result.export else "") + (", eval/" if result.evaluations else "") + ")")
    if result.evaluations:
        print()
        print(_evaluation_report(result.evaluations, result.output_dir))
    return 0


def _evaluation_report(evaluations: dict, output_dir: Path) -> str:
    """The before/after (or after-only) tables, also written to ``eval/summary.md`` with a PNG per
    evaluator."""
    from vlmkit.core.evaluation.runner import EVAL_DIR, comparison, comparison_plot, examples_table, table

    after = evaluations.get("after", [])
    before = evaluations.get("before")
    folder = output_dir / EVAL_DIR
    if before:
        text = comparison(before, after)
        earlier = {b.name: b for b in before}  # by name: results read back from files come in file-name order
        for a in after:
            b = earlier.get(a.name)
            comparison_plot([b, a] if b else [a], ["before", "after"] if b else ["after"], folder / f"{a.name}.png")
    else:
        parts = []
        for a in after:
            parts.append(table([a], ["after"]))
            if a.examples:
                parts.append(examples_table([a], ["after"]))
            comparison_plot([a], ["after"], folder / f"{a.name}.png")
        text = "\n\n".join(parts)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.md").write_text(text + "\n", encoding="utf-8")
    return text + f"\n\n(written to {folder / 'summary.md'} with a plot per evaluator)"


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from vlmkit.core.evaluation.runner import EVAL_DIR, examples_table, run_evaluations, table
    from vlmkit.core.export import find_export, load_with_recipe

    overrides = list(args.overrides)
    if args.data:
        overrides.append("eval=" + json.dumps([{"type": "instructions", "data": list(args.data)}]))
    registry = _registry(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    export = find_export(args.model)
    model, resolved = load_with_recipe(export, device=device, registry=registry, overrides=overrides,
                                       trust_remote_code=args.trust_remote_code)
    if not resolved.evaluators:
        raise VlmkitError(f"{export / 'recipe.yaml'}: the recipe has no eval list; name held-out data entries of its "
                          f"data section with --data (defined: {', '.join(resolved.recipe.data)})")
    out = args.output_dir or (export.parent if export.name == "export" else export)
    results = run_evaluations(model, resolved, out, args.label, registry=registry, progress=not args.no_progress)
    for result in results:
        print(table([result], [args.label]))
        if result.examples:
            print()
            print(examples_table([result], [args.label]))
        print()
    print(f"results: {out / EVAL_DIR / args.label}/")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    import torch

    from vlmkit.core.chat import Chat, load_image, pick_template
    from vlmkit.core.export import load_with_recipe

    image = load_image(args.image, "--image") if args.image else None
    examples = [(load_image(path, f"--example {i + 1}"), q, a) for i, (path, q, a) in enumerate(args.example)]
    if args.max_new_tokens < 1:
        raise VlmkitError(f"--max-new-tokens: must be at least 1, got {args.max_new_tokens}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, resolved = load_with_recipe(args.model, device=device, registry=_registry(args),
                                       trust_remote_code=args.trust_remote_code)
    chat = Chat(model, pick_template(model, resolved, args.template), image, examples, args.max_new_tokens)
    if args.question:
        for question in args.question:
            print(f"> {question}")
            print(chat.ask(question))
        return 0
    print(f"{len(examples)} in-context example(s); ask about {args.image or 'no image'} (empty line or Ctrl-D ends)")
    while True:
        try:
            question = input("> ")
        except EOFError:
            print()
            return 0
        if not question.strip():
            return 0
        print(chat.ask(question))


def cmd_serve(args: argparse.Namespace) -> int:
    from vlmkit.serve.cli import serve

    return serve(args, _registry(args))


def cmd_data(args: argparse.Namespace) -> int:
    from vlmkit.demo import data as demo
    from vlmkit.syphus.cli import DATA_COMMANDS

    if args.data_command in DATA_COMMANDS:
        _registry(args)  # a strict registry, if asked for, serves the backends' lookups too
        return DATA_COMMANDS[args.data_command](args)
    if args.data_command == "concepts":
        from vlmkit.lcl import synthetic_concepts as concepts

        out = concepts.concepts_data_dir(args.seed) if args.out is None else concepts.write_concepts(args.out, seed=args.seed)
        meta = json.loads((out / "concepts.json").read_text(encoding="utf-8"))
        pairs = json.loads((out / "heldout_pairs.json").read_text(encoding="utf-8"))
        print(f"{out}: {meta['train_classes']} training classes in train/ ({meta['train_images_per_class']} pictures each), "
              f"{meta['heldout_novel']} held-out novel concepts in heldout/ with their look-alikes "
              f"(heldout_pairs.json), e.g. " + ", ".join(f"{k} ~ {v}" for k, v in list(pairs.items())[:3]))
        return 0
    if args.out is None:
        out = demo.demo_data_dir(args.seed, args.size)
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    else:
        out = args.out
        manifest = demo.write_demo_data(out, seed=args.seed, size=args.size)
    print(demo.summary(manifest, out))
    return 0


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


COMMANDS = {
    "list": cmd_list,
    "show": cmd_show,
    "validate": cmd_validate,
    "components": cmd_components,
    "plugins": cmd_plugins,
    "schema": cmd_schema,
    "params": cmd_params,
    "run": cmd_run,
    "eval": cmd_eval,
    "chat": cmd_chat,
    "serve": cmd_serve,
    "data": cmd_data,
}


if __name__ == "__main__":
    raise SystemExit(main())
