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
from vlmkit.core.interfaces import Sample

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
    """A conversation about one image, several images, a video clip (or nothing), after fixed
    in-context examples.

    ``image``: one PIL image, or a list of them (each its own media, in order); ``video``: the
    frames of one clip in time order (one media, after the images). ``options``: more keyword
    arguments for the model's ``generate`` (sampling, a streamer, stopping criteria; see
    :func:`vlmkit.core.evaluation.generation.generate`)."""

    model: Any
    template: Any
    image: Any | None = None
    examples: list[tuple[Any, str, str]] = field(default_factory=list)  # (image, question, answer)
    max_new_tokens: int = 32
    history: list[tuple[str, str]] = field(default_factory=list)
    video: list[Any] | None = None
    num_beams: int = 1

    def _images(self) -> list[Any]:
        if self.image is None:
            return []
        return list(self.image) if isinstance(self.image, (list, tuple)) else [self.image]

    def record(self, question: str) -> Record:
        context = [
            Exchange(turns=[Turn("user", q), Turn("assistant", a)], media=[Media(f"example{i}", [img])], id=f"example{i}")
            for i, (img, q, a) in enumerate(self.examples)
        ]
        turns: list[Turn] = []
        for q, a in self.history:
            turns += [Turn("user", q), Turn("assistant", a)]
        turns += [Turn("user", question), Turn("assistant", _PENDING)]
        images = self._images()
        media = [Media("query" if len(images) == 1 else f"query{i}", [img]) for i, img in enumerate(images)]
        if self.video:
            media.append(Media("video", list(self.video)))
        return Record(id="chat", query=Exchange(turns=turns, media=media, id="query"), context=context)

    def prompt(self, question: str) -> Sample:
        """The rendered conversation up to the answer to ``question`` (what the model continues)."""
        question = question.strip()
        if not question:
            raise VlmkitError("empty question")
        sample = self.template.render(self.record(question), self.model.decoder.tokenizer)
        return split_prompt(sample)[0]

    def ask(self, question: str, options: dict[str, Any] | None = None) -> str:
        prompt = self.prompt(question)
        answer = generate(self.model, [prompt], self.template, max_new_tokens=self.max_new_tokens, batch_size=1,
                          num_beams=self.num_beams, options=options)[0]
        self.history.append((question.strip(), answer or _PENDING))
        return answer
