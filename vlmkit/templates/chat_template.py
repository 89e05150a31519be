"""The decoder tokenizer's own chat template (``tokenizer.apply_chat_template``, Jinja).

The record becomes a list of messages: an optional system message (``system``; unset, the
template's own default, if any, applies), then the user/assistant turns of each in-context example
and of the query, in order. Each exchange's media are ``<image>`` markers at the start of its first
user message, each followed by ``image_separator`` (default ``"\\n"``, as LLaVA writes
``<image>\\n{question}``); a ``shared_media`` record puts the query's media at the start of the
first user message of the conversation.

The text is the template's rendering of the whole conversation, unchanged (a BOS that the template
writes stays; the collator decides about its own BOS). The loss mask comes from character spans,
never from counting tokens: for the assistant message ``i``, the rendering of ``messages[:i]`` with
the generation prompt and the rendering of ``messages[:i + 1]`` must both be prefixes of the full
text; the message's content is located in what the second adds to the first (by rendering a
stand-in content in its place, which shows the template's header and end marker around it, or,
failing that, by searching for the content), and the trained span runs from the content's start
to the end of that addition, less trailing whitespace when an end marker remains (e.g. ``"{content}<|im_end|>"`` of ``"{content}<|im_end|>\\n"``; a template that
ends a message with whitespace alone has that whitespace trained as its end marker). So the
trained segments are exactly each assistant message's content and its end marker; the role
headers (the generation prompt) are not trained. ``train_context_answers`` (default true) can
restrict the loss to the query's answers.

Units: in-context example ``k`` (messages ``[j, e)``) ends where the rendering of ``messages[:e]``
ends, and starts where the rendering of the conversation without it stops agreeing with the full
text, so dropping the unit leaves exactly the rendering of the record without that example
(including any default system line the template writes before the first message). A
``shared_media`` record has no units: its media markers sit in the first example's message.

Errors: a tokenizer without a chat template, a template that fails on the conversation, or one that
does not render it incrementally (an earlier prefix that is not a prefix of the full text, as
templates that rewrite past turns do) are :class:`~vlmkit.core.errors.VlmkitError` naming the record.
"""

from __future__ import annotations

import bisect
from typing import Any, ClassVar

from vlmkit.templates.base import (
    IMAGE,
    check_record,
    exchanges,
    media_item,
    pairs,
    record_error,
    shared_media,
)
from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import Sample, Template, TemplateConfig


#: a stand-in assistant content that shows where a template puts the content
PROBE = "VLMKIT-CONTENT-PROBE-5f1c"


class ChatTemplateConfig(TemplateConfig):
    system: str | None = None
    """A system message to open every conversation; unset: none (the template's default applies)."""
    image_separator: str = "\n"
    """Written after each ``<image>`` marker at the start of a user message."""
    train_context_answers: bool = True
    """Train the answers of the in-context examples (earlier turns) too."""


class ChatTemplate(Template):
    Config: ClassVar[type[TemplateConfig]] = ChatTemplateConfig

    def render(self, record: Any, tokenizer: Any) -> Sample:
        check_record(record, "chat_template")
        if not getattr(tokenizer, "chat_template", None):
            raise VlmkitError(
                "template chat_template: the decoder's tokenizer has no chat template; name a template with "
                "a fixed format instead (vicuna_v1, mplug_owl, otter, ...)"
            )
        cfg = self.config
        shared = bool(record.shared_media)
        named = exchanges(record)
        messages: list[dict[str, str]] = []
        if cfg.system is not None:
            messages.append({"role": "system", "content": cfg.system})
        images: list[Any] = []
        spans: list[tuple[int, int]] = []  # each exchange's messages [start, end)
        trained_msgs: list[int] = []
        sep = cfg.image_separator
        for k, (where, ex) in enumerate(named):
            turns = pairs(record, ex, where)
            if shared:
                media = shared_media(record) if k == 0 else []
            else:
                media = list(ex.media)
            images.extend(media_item(record, m) for m in media)
            markers = "".join(IMAGE + sep for _ in media)
            start = len(messages)
            train = k == len(named) - 1 or cfg.train_context_answers
            for i, (question, answer) in enumerate(turns):
                messages.append({"role": "user", "content": (markers if i == 0 else "") + question})
                if train:
                    trained_msgs.append(len(messages))
                messages.append({"role": "assistant", "content": answer})
            spans.append((start, len(messages)))

        def render(msgs: list[dict[str, str]], prompt: bool = False) -> str:
            try:
                text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)
            except Exception as exc:  # jinja errors, raise_exception() in templates
                raise record_error(record, f"the tokenizer's chat template failed: {exc}") from None
            if not isinstance(text, str):
                raise record_error(record, "the tokenizer's chat template did not render text")
            return text

        def not_incremental(what: str) -> VlmkitError:
            return record_error(
                record,
                f"the tokenizer's chat template does not render the conversation incrementally ({what}); "
                "its loss mask cannot be found from prefixes: use a fixed-format template (vicuna_v1, ...)",
            )

        full = render(messages)
        trained: list[tuple[int, int]] = []
        for i in trained_msgs:
            before = render(messages[:i], prompt=True)
            after = render(messages[: i + 1])
            if not (full.startswith(before) and full.startswith(after) and len(after) > len(before)):
                raise not_incremental(f"message {i}")
            added = after[len(before) :]
            begin, stop = self._content_span(render, messages, i, before, added)
            if begin < 0:
                raise record_error(
                    record, f"the chat template's rendering of assistant message {i} does not contain its text"
                )
            marker = added[stop:].rstrip()
            end = stop + len(marker) if marker else len(added)  # whitespace alone is then the end marker
            trained.append((len(before) + begin, len(before) + end))

        units: list[tuple[int, int]] = []  # character ranges
        if not shared:
            for k, (j, e) in enumerate(spans[:-1]):
                head = render(messages[:e])
                if not full.startswith(head):
                    raise not_incremental(f"in-context example {k}")
                q = len(head)
                rest = render(messages[:j] + messages[e:])
                tail = len(full) - q
                p = len(rest) - tail
                if p < 0 or rest[p:] != full[q:] or rest[:p] != full[:p]:
                    raise not_incremental(f"in-context example {k}")
                units.append((p, q))
            edges = [edge for unit in units for edge in unit]
            if edges != sorted(edges) or any(a < p < b or a < q < b for a, b in trained for p, q in units):
                raise not_incremental("its examples overlap")

        cuts = sorted({0, len(full), *(x for span in trained for x in span), *(x for unit in units for x in unit)})
        starts = [a for a, _ in trained]
        segments: list[tuple[str, bool]] = []
        for a, b in zip(cuts, cuts[1:]):
            if a == b:
                continue
            i = bisect.bisect_right(starts, a) - 1
            is_trained = i >= 0 and trained[i][0] <= a < trained[i][1]
            segments.append((full[a:b], is_trained))
        offsets = [0]
        for text, _ in segments:
            offsets.append(offsets[-1] + len(text))
        sample_units = []
        for k, (p, q) in enumerate(units):
            s0, s1 = offsets.index(p), offsets.index(q)
            i0, i1 = full[:p].count(IMAGE), full[:q].count(IMAGE)
            if i1 - i0 != len(named[k][1].media):
                raise not_incremental(f"in-context example {k} does not hold its {IMAGE} markers")
            sample_units.append((s0, s1, i0, i1))
        if full.count(IMAGE) != len(images):
            raise record_error(
                record,
                f"the chat template's text has {full.count(IMAGE)} {IMAGE} markers for {len(images)} media "
                f"(does the system message hold '{IMAGE}'?)",
            )
        return Sample(id=str(record.id), images=images, segments=segments, units=sample_units)

    @staticmethod
    def _content_span(render: Any, messages: list[dict[str, str]], i: int, before: str, added: str) -> tuple[int, int]:
        """Where assistant message ``i``'s content lies in ``added`` (its rendering after the
        generation prompt): the template renders a stand-in content once, which shows its header
        and end marker; if the real rendering does not share them, the content is searched for.
        ``(-1, -1)`` if it is not found."""
        probe = render(messages[:i] + [{"role": "assistant", "content": PROBE}])
        if probe.startswith(before) and PROBE in probe[len(before) :]:
            rendered = probe[len(before) :]
            k = rendered.index(PROBE)
            header, tail = rendered[:k], rendered[k + len(PROBE) :]
            if added.startswith(header) and added.endswith(tail) and len(header) + len(tail) <= len(added):
                return len(header), len(added) - len(tail)
        content = messages[i]["content"]
        for text in (content, content.strip()):
            pos = added.find(text)
            if pos >= 0:
                return pos, pos + len(text)
        return -1, -1
