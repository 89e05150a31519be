"""Talking to a trained model: a question about an image, optionally after in-context examples
(image, question, answer), rendered by one of the recipe's chat templates and answered greedily.

Used by ``recipes chat``; :class:`Chat` keeps the conversation so follow-up questions see the
earlier turns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmkit.core.data.records import Exchange, Media, Record, Turn
from vlmkit.core.errors import VlmkitError
from vlmkit.core.evaluation.generation import generate, split_prompt

#: stands in for the answer to come: the template renders it, the prompt is cut before it
_PENDING = "..."


def load_image(path: str | Path, what: str) -> Any:
    """An RGB PIL image, or an error naming ``what`` (e.g. ``--image``)."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path).expanduser()
    if not file.is_file():
        raise VlmkitError(f"{what}: '{file}' does not exist")
    try:
        with Image.open(file) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise VlmkitError(f"{what}: '{file}' is not a readable image: {exc}") from None


def pick_template(model: Any, resolved: Any, name: str | None) -> Any:
    """The template named ``name`` among the recipe's (by template name or data alias); default:
    the template of the last stage's first dataset."""
    templates = dict(model.templates)
    if not templates:
        raise VlmkitError("the model's recipe names no chat template in its data section")
    if name is None:
        last = resolved.recipe.stages[-1].data[0]
        if last in templates:
            return templates[last]
        return next(iter(templates.values()))
    if name in templates:
        return templates[name]
    by_name = {spec.name: alias for alias, spec in resolved.templates.items()}
    if name in by_name:
        return templates[by_name[name]]
    raise VlmkitError(f"--template: '{name}' is not a template of this model's recipe; choose one of: "
                      f"{', '.join(sorted(set(by_name) | set(templates)))}")


@dataclass
class Chat:
    """A conversation about one image (or none), after fixed in-context examples."""

    model: Any
    template: Any
    image: Any | None = None
    examples: list[tuple[Any, str, str]] = field(default_factory=list)  # (image, question, answer)
    max_new_tokens: int = 32
    history: list[tuple[str, str]] = field(default_factory=list)

    def record(self, question: str) -> Record:
        context = [
            Exchange(turns=[Turn("user", q), Turn("assistant", a)], media=[Media(f"example{i}", [img])], id=f"example{i}")
            for i, (img, q, a) in enumerate(self.examples)
        ]
        turns: list[Turn] = []
        for q, a in self.history:
            turns += [Turn("user", q), Turn("assistant", a)]
        turns += [Turn("user", question), Turn("assistant", _PENDING)]
        media = [Media("query", [self.image])] if self.image is not None else []
        return Record(id="chat", query=Exchange(turns=turns, media=media, id="query"), context=context)

    def ask(self, question: str) -> str:
        question = question.strip()
        if not question:
            raise VlmkitError("empty question")
        sample = self.template.render(self.record(question), self.model.decoder.tokenizer)
        prompt, _ = split_prompt(sample)
        answer = generate(self.model, [prompt], self.template, max_new_tokens=self.max_new_tokens, batch_size=1)[0]
        self.history.append((question, answer or _PENDING))
        return answer
