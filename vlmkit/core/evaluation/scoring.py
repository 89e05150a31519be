"""Scorers of generated answers against references."""

from __future__ import annotations

import re
import string

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: ``" Red."`` -> ``"red"``."""
    return _SPACE.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def exact_match(prediction: str, reference: str) -> bool:
    """The prediction is the reference, up to case, punctuation and spacing."""
    return normalize(prediction) == normalize(reference)


# ------------------------------------------------------------------------------------------- VQA
# The VQA benchmark's answer normalisation, as OpenFlamingo's ``vqa_metric.py`` applies it (to the
# prediction and to every human answer, always).
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# the benchmark's period pattern is "(?!<=\d)(\.)(?!\d)": its first group is a lookahead that never
# fails, so a period goes unless a digit follows ("3.5" stays, "3." loses it); it is applied with
# count=re.UNICODE (32), so at most 32 periods go
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_COUNT = 32
_ARTICLES = {"a", "an", "the"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
# the benchmark's contraction table: apostrophe-less spellings -> the spelling with apostrophes
_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've
oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's
somethingd=something'd somethingd've=something'd've something'dve=something'd've somethingll=something'll
thats=that's thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's
theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've
twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've
whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll
whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've
wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll
youre=you're youve=you've
""".split())


def vqa_normalize(text: str) -> str:
    """The VQA benchmark's answer normalisation (OpenFlamingo's ``VQAEval``): newlines and tabs to
    spaces, stripped; punctuation (``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``; not ``'`` or
    ``:``) removed where it touches a space or the text holds a digit-comma-digit, else replaced
    by a space; a period not followed by a digit removed; then lower case, number words 0-10 as
    digits, articles out, apostrophe-less contractions written with their apostrophes."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    glue = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _VQA_PUNCT:
        # the test reads the text before any replacement, as the benchmark does
        out = out.replace(p, "" if glue or p + " " in text or " " + p in text else " ")
    out = _PERIOD.sub("", out, count=_PERIOD_COUNT)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of ``prediction`` against the human ``answers`` (all of them, normalised as
    :func:`vqa_normalize`): for each answer, ``min(1, (how many of the OTHER answers equal the
    prediction) / 3)``, averaged over the answers -- with VQA's 10 answers the mean over the 10
    subsets of 9. With a single reference (data without human answers) the leave-one-out mean is
    undefined (always 0), so it scores as exact match after normalisation."""
    pred = vqa_normalize(prediction)
    refs = [vqa_normalize(a) for a in answers]
    if not refs:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    if len(refs) == 1:
        return float(refs[0] == pred)
    matches = sum(r == pred for r in refs)
    scores = [min(1.0, (matches - (r == pred)) / 3) for r in refs]
    return sum(scores) / len(scores)


# ----------------------------------------------------------------------------- post-processing
_VQA_CUT = re.compile("Question|Answer|Short")


def postprocess_vqa(text: str) -> str:
    """OpenFlamingo's ``postprocess_vqa_generation``: the generated text up to the first
    ``Question``, ``Answer`` or ``Short`` (the model going on with the next demonstration), then up
    to the first ``", "``; stripped (the VQA evaluation strips it)."""
    return _VQA_CUT.split(text, maxsplit=1)[0].split(", ", 1)[0].strip()


def postprocess_caption(text: str) -> str:
    """OpenFlamingo's captioning post-processing: the generated text up to the first ``Output``,
    double quotes removed; stripped."""
    return text.split("Output", 1)[0].replace('"', "").strip()


# ----------------------------------------------------------------------------------------- CIDEr
def _ngrams(words: list[str], n: int) -> dict[tuple[str, ...], int]:
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        key = tuple(words[i:i + n])
        counts[key] = counts.get(key, 0) + 1
    return counts


def cider_d(predictions: dict[str, str], references: dict[str, list[str]], *, n: int = 4, sigma: float = 6.0) -> tuple[float, dict[str, float]]:
    """CIDEr-D (Vedantam et al. 2015, the COCO caption evaluation's ``Cider``): corpus mean and per-item scores.

    Captions are split on whitespace (tokenise and lower-case them first). For each n-gram order
    1..n, a caption's vector holds ``count * log(N / df)`` (``df``: how many items' references
    contain the n-gram, ``N``: items); the score of a prediction against one reference is the sum of
    ``min(pred, ref) * ref`` over n-grams divided by both norms, times ``exp(-(len_pred - len_ref)^2 /
    (2 sigma^2))``; orders are averaged, references averaged, and the result scaled by 10."""
    import math

    ids = list(predictions)
    if not ids or set(ids) != set(references):
        raise ValueError("cider_d: predictions and references must cover the same, non-empty set of ids")
    doc_freq: dict[tuple[str, ...], int] = {}
    for item in ids:
        seen: set[tuple[str, ...]] = set()
        for ref in references[item]:
            words = ref.split()
            for k in range(1, n + 1):
                seen.update(_ngrams(words, k))
        for gram in seen:
            doc_freq[gram] = doc_freq.get(gram, 0) + 1
    log_n = math.log(float(len(ids)))

    def vector(text: str) -> tuple[list[dict], list[float], int]:
        words = text.split()
        vecs, norms = [], []
        for k in range(1, n + 1):
            vec = {g: c * (log_n - math.log(max(1.0, doc_freq.get(g, 0.0)))) for g, c in _ngrams(words, k).items()}
            vecs.append(vec)
            norms.append(math.sqrt(sum(v * v for v in vec.values())))
        return vecs, norms, len(words)

    scores: dict[str, float] = {}
    for item in ids:
        hyp, hyp_norm, hyp_len = vector(predictions[item])
        total = [0.0] * n
        for ref_text in references[item]:
            ref, ref_norm, ref_len = vector(ref_text)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(min(v, ref[k].get(g, 0.0)) * ref[k].get(g, 0.0) for g, v in hyp[k].items())
                if hyp_norm[k] and ref_norm[k]:
                    total[k] += dot / (hyp_norm[k] * ref_norm[k]) * penalty
        scores[item] = 10.0 * sum(total) / n / len(references[item])
    return sum(scores.values()) / len(scores), scores


def caption_tokens(text: str) -> str:
    """Lower case, punctuation out, single spaces: what :func:`cider_d` expects."""
    return normalize(text)
