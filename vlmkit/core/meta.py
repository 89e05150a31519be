"""Building a model on the meta device: every tensor has a shape and no storage, nothing is
loaded or downloaded. Used to count a recipe's parameters per component and stage (``recipes
params``), e.g. a 7B ``paper`` profile on a laptop.

The builder passes a :class:`~vlmkit.core.interfaces.BuildContext` with ``meta=True`` to every
component's ``build`` and calls no ``load_weights`` (the plug-in contract in
:mod:`vlmkit.core.interfaces`). Backbones named by hub id need
their architecture: from the local Hugging Face cache when it is there, else from
``known_architectures.yaml`` (published configs of the backbones the shipped paper profiles name),
with a stand-in tokenizer of the right size (it tokenises nothing).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from vlmkit.core.errors import VlmkitError


@lru_cache(maxsize=1)
def _known() -> dict[str, Any]:
    text = resources.files("vlmkit").joinpath("known_architectures.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def architecture(ref: str, field: str) -> dict[str, Any]:
    """The transformers config dict (with ``model_type``) of hub id or folder ``ref`` for a meta
    build: the local copy's ``config.json`` if there is one, else the known architectures."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref, local_files_only=True).to_dict()
    except (OSError, ValueError):
        pass
    known = _known().get(ref)
    if known is None:
        raise VlmkitError(
            f"{field}: building '{ref}' on the meta device needs its config, but it is neither in the local Hugging Face "
            f"cache nor among the known architectures ({', '.join(sorted(_known()))})"
        )
    return dict(known["config"])


def stand_in_tokenizer(ref: str, field: str) -> Any:
    """A tokenizer with the vocabulary size and special tokens of ``ref``'s (its local copy if
    there is one), for counting the embedding rows that added tokens need."""
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(ref, local_files_only=True)
    except (OSError, ValueError):
        pass
    known = _known().get(ref)
    if known is None or "tokenizer" not in known:
        raise VlmkitError(f"{field}: no tokenizer of '{ref}' is available for a meta build (not cached, not known)")
    spec = known["tokenizer"]
    specials = {k: spec[k] for k in ("unk", "bos", "eos", "pad") if spec.get(k)}
    vocab = {f"<tok{i}>": i for i in range(int(spec["vocab_size"]))}
    for i, token in enumerate(dict.fromkeys(specials.values())):
        del vocab[f"<tok{i}>"]
        vocab[token] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials.get("unk", next(iter(vocab)))))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **{f"{k}_token": v for k, v in specials.items()})
