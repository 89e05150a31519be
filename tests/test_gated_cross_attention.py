"""The gated_cross_attention fusion (Flamingo): OpenFlamingo parity, exactness at init, media masking,
cached generation that keeps the image, gradients, and composition from a recipe."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image
from torch import nn

from tiny import resolved_toy
from vlmkit.core.engine.step import answer_loss
from vlmkit.connectors.gated_cross_attention import (
    GatedCrossAttentionBlock,
    GatedCrossAttentionConfig,
    GatedCrossAttentionFusion,
)
from vlmkit.core.compose import build_model
from vlmkit.core.data.collate import IGNORE, Collator
from tiny import ToyCaptions, ToyCaptionsConfig  # rendered with llava_plain, as the toy recipe does
from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import Preprocess, Sample
from vlmkit.decoders.hf_causal_lm import HFCausalLM, HFCausalLMConfig

of_helpers = pytest.importorskip("open_flamingo.src.helpers")
of_lm = pytest.importorskip("open_flamingo.src.flamingo_lm")

D, D_VIS, Q = 32, 24, 4
FAMILIES = {
    "llama": {"model_type": "llama", "hidden_size": D, "intermediate_size": 64, "num_hidden_layers": 4,
              "num_attention_heads": 2, "num_key_value_heads": 1},
    "gpt2": {"model_type": "gpt2", "n_embd": D, "n_layer": 4, "n_head": 2},
    "qwen2": {"model_type": "qwen2", "hidden_size": D, "intermediate_size": 64, "num_hidden_layers": 4,
              "num_attention_heads": 2, "num_key_value_heads": 1},
}


def _decoder(family: str = "llama", **extra) -> HFCausalLM:
    torch.manual_seed(0)
    return HFCausalLM(HFCausalLMConfig(config=FAMILIES[family], tokenizer_type="byte_level", **extra)).eval()


def _fusion(decoder: HFCausalLM, **config) -> GatedCrossAttentionFusion:
    config = {"heads": 2, "dim_head": 16, **config}
    fusion = GatedCrossAttentionFusion(GatedCrossAttentionConfig(**config))
    fusion.attach(decoder, D_VIS)
    return fusion.eval()


def _set_gates(fusion: GatedCrossAttentionFusion, value: float) -> None:
    with torch.no_grad():
        for block in fusion.blocks:
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(value)


def _ids(tok, img: int, *pieces: str | None) -> list[int]:
    """Token ids of ``pieces``; ``None`` stands for one <image> marker."""
    out: list[int] = []
    for p in pieces:
        out += [img] if p is None else tok(p, add_special_tokens=False)["input_ids"]
    return out


def _batch(rows: list[list[int]], pad: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(L - len(r), L) if side == "left" else slice(0, len(r))
        ids[b, sl] = torch.tensor(r)
        mask[b, sl] = 1
    return ids, mask


# ------------------------------------------------------------------------------- block parity
def _of_pair(only_immediate: bool, gates=(0.7, -0.45)):
    torch.manual_seed(1)
    of = of_helpers.GatedCrossAttentionBlock(dim=D, dim_visual=D_VIS, dim_head=8, heads=4, ff_mult=2,
                                             only_attend_immediate_media=only_immediate)
    with torch.no_grad():
        of.attn_gate.fill_(gates[0])
        of.ff_gate.fill_(gates[1])
    ours = GatedCrossAttentionBlock(D, D_VIS, heads=4, dim_head=8, ff_mult=2,
                                    only_attend_immediate_media=only_immediate)
    ours.load_state_dict(of.state_dict())  # same parameter names and shapes
    return of, ours


def _locations() -> torch.Tensor:
    """(3, 12) media locations: two images from the start; three images after 2 text tokens; one image
    after 4 text tokens (its sample has two padded image slots)."""
    loc = torch.zeros(3, 12, dtype=torch.bool)
    loc[0, [0, 6]] = True
    loc[1, [2, 5, 9]] = True
    loc[2, [4]] = True
    return loc


@pytest.mark.parametrize("only_immediate", [True, False])
def test_block_matches_open_flamingo(only_immediate):
    of, ours = _of_pair(only_immediate)
    torch.manual_seed(2)
    x = torch.randn(3, 12, D)
    media = torch.randn(3, 3, Q, D_VIS)  # padded slots hold noise: masking, not zeros, must keep them out
    loc = _locations()
    media_mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    index = loc.long().cumsum(1)
    with torch.no_grad():
        want = of(x, media, media_locations=loc)
        got = ours(x, media, index, media_mask)
    after = index > 0
    diff = (got - want).abs()[after].max().item()
    assert diff <= 1e-5, diff
    before = ~after  # text before the first image: 2 tokens of sample 1, 4 of sample 2
    assert int(before.sum()) == 6
    if only_immediate:
        assert (got - want).abs()[before].max().item() <= 1e-5
    else:
        # OpenFlamingo gives such tokens uniform attention over ALL latents (future images included)
        # when not only_attend_immediate_media; vlmkit gives them zero attention in both modes.
        assert not torch.allclose(got[before], want[before], atol=1e-3)
        no_attn = copy.deepcopy(of)
        with torch.no_grad():
            no_attn.attn_gate.zero_()
            assert (got[before] - no_attn(x, media, media_locations=loc)[before]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("only_immediate", [True, False])
def test_block_matches_open_flamingo_cached_media(only_immediate):
    """New tokens after a cached prefix: OpenFlamingo's use_cached_media (every token after the last
    image) equals our block given each row's image count as the index."""
    of, ours = _of_pair(only_immediate)
    torch.manual_seed(3)
    x = torch.randn(3, 2, D)  # two new tokens per row
    media = torch.randn(3, 3, Q, D_VIS)
    loc = _locations()  # the cached prefix
    media_mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    index = loc.sum(1, keepdim=True).expand(3, 2)
    with torch.no_grad():
        want = of(x, media, media_locations=loc, use_cached_media=True)
        got = ours(x, media, index, media_mask)
    assert (got - want).abs().max().item() <= 1e-5


def test_block_masking_attends_to_the_right_images():
    ours = _of_pair(True)[1]
    all_prev = _of_pair(False)[1]
    torch.manual_seed(4)
    x = torch.randn(1, 10, D)
    index = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 3, 3, 3]])
    media = torch.randn(1, 3, Q, D_VIS)
    other = media.clone()
    other[0, 1] = torch.randn(Q, D_VIS)  # change image 2
    with torch.no_grad():
        a, b = ours(x, media, index), ours(x, other, index)
        changed = (a - b).abs().amax(-1)[0] > 0
        assert changed.tolist() == (index[0] == 2).tolist()  # exactly the tokens of image 2
        a, b = all_prev(x, media, index), all_prev(x, other, index)
        changed = (a - b).abs().amax(-1)[0] > 0
        assert changed.tolist() == (index[0] >= 2).tolist()  # image 2 and everything after it
        # a padded image is never attended, even with only_attend_immediate_media False
        mask = torch.tensor([[True, True, False]])
        third = media.clone()
        third[0, 2] = torch.randn(Q, D_VIS)
        assert torch.equal(all_prev(x, media, index, mask), all_prev(x, third, index, mask))
        # tokens before any image: zero attention, only the gated feed-forward
        out = ours(x, media, index)
        ff_only = x + ours.ff_gate.tanh() * ours.ff(x)
        assert torch.equal(out[0, :2], ff_only[0, :2])


# ------------------------------------------------------------------------- placement, exactness
def _of_block_layers(num_layers: int, every: int) -> list[int]:
    """OpenFlamingo's own choice of the layers that get a block (FlamingoLMMixin.init_flamingo)."""

    class Stub(of_lm.FlamingoLMMixin):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Identity() for _ in range(num_layers))

    stub = Stub()
    stub.set_decoder_layers_attr_name("layers")
    stub.init_flamingo(media_token_id=0, lang_hidden_size=8, vis_hidden_size=8, cross_attn_every_n_layers=every,
                       gradient_checkpointing=False)
    return [i for i, block in enumerate(stub.gated_cross_attn_layers) if block is not None]


@pytest.mark.parametrize("every", [1, 2, 3])
def test_blocks_sit_before_open_flamingos_layers(every):
    dec = _decoder("llama")
    fusion = _fusion(dec, every_n_layers=every)
    expected = _of_block_layers(4, every)
    assert fusion.layer_indices == expected and len(fusion.blocks) == len(expected)
    _set_gates(fusion, 1.0)
    layers = dec.decoder_layers()
    seen_in, seen_out = {}, {}
    handles = []
    for i, layer in enumerate(layers):  # registered after the fusion's hooks: sees the block's output
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k, i=i: seen_in.__setitem__(i, (a[0] if a else k["hidden_states"]).clone()), with_kwargs=True))
        handles.append(layer.register_forward_hook(
            lambda m, a, o, i=i: seen_out.__setitem__(i, (o[0] if isinstance(o, tuple) else o).clone())))
    img = fusion.image_token_id
    ids = torch.tensor([_ids(dec.tokenizer, img, None, "a cat")])
    with torch.no_grad():
        fusion(dec, ids, torch.ones_like(ids), torch.randn(1, 1, Q, D_VIS), torch.ones(1, 1, dtype=torch.bool))
    for h in handles:
        h.remove()
    embeds = dec.get_input_embeddings()(ids)
    modified = [i for i in range(4) if not torch.equal(seen_in[i], embeds if i == 0 else seen_out[i - 1])]
    assert modified == expected


def test_too_large_every_n_layers_is_a_build_error():
    with pytest.raises(VlmkitError, match="model.fusion.every_n_layers"):
        _fusion(_decoder("llama"), every_n_layers=5)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("every", [1, 2])
def test_zero_gates_leave_the_decoder_exactly_unchanged(family, every):
    dec = _decoder(family)
    img = dec.add_special_tokens(["<image>"])["<image>"]
    bare = copy.deepcopy(dec)
    names = list(dec.state_dict())
    fusion = _fusion(dec, every_n_layers=every)
    assert fusion.image_token_id == img
    assert list(dec.state_dict()) == names  # hooks, not wrappers: the decoder's state-dict is unchanged
    assert len(fusion.blocks) == len(_of_block_layers(4, every))
    tok = dec.tokenizer
    rows = [_ids(tok, img, "hi ", None, "a cat ", None, "two"), _ids(tok, img, None, "one")]
    ids, mask = _batch(rows, tok.pad_token_id)
    media = torch.randn(2, 2, Q, D_VIS)
    media_mask = torch.tensor([[True, True], [True, False]])
    with torch.no_grad():
        want = bare(inputs_embeds=bare.get_input_embeddings()(ids), attention_mask=mask).logits
        got = fusion(dec, ids, mask, media, media_mask).logits
    assert torch.equal(got, want)
    # and the blocks do act once the gates open
    _set_gates(fusion, 0.5)
    with torch.no_grad():
        assert not torch.allclose(fusion(dec, ids, mask, media, media_mask).logits, want, atol=1e-3)


def test_layers_path_override_and_wrong_path(tmp_path):
    dec = _decoder("gpt2", layers_path="transformer.h")
    fusion = _fusion(dec, every_n_layers=2)
    assert fusion.layer_indices == [1, 3]

    def wrong(data):
        data["model"]["decoder"]["layers_path"] = "model.nope"
        data["model"]["fusion"] = {"name": "gated_cross_attention", "heads": 2, "dim_head": 16}
        data["model"]["connector"]["width_out"] = 32

    with pytest.raises(VlmkitError, match="model.decoder.layers_path"):
        build_model(resolved_toy(tmp_path, wrong))


def test_decoder_called_outside_the_fusion_is_refused():
    dec = _decoder("llama")
    _fusion(dec)
    with pytest.raises(RuntimeError, match="through the fusion"):
        dec(inputs_embeds=torch.randn(1, 3, D))


def _pre_hook_counts(dec: HFCausalLM) -> list[int]:
    """The forward pre-hooks on every decoder layer and on the transformers model."""
    return [len(m._forward_pre_hooks) for m in (*dec.decoder_layers(), dec.generation_module())]


def _tensors_outside_parameters(fusion: GatedCrossAttentionFusion) -> list[str]:
    """Attributes of the fusion (other than its parameters, buffers and submodules) that reference a
    tensor, looking into containers and dataclasses but not into other modules."""
    found = []

    def walk(value, where, seen):
        if id(value) in seen or isinstance(value, nn.Module):
            return
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            found.append(where)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}[{k!r}]", seen)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]", seen)
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            for k, v in vars(value).items():
                walk(v, f"{where}.{k}", seen)

    for name, value in vars(fusion).items():
        if name not in ("_parameters", "_buffers", "_modules"):
            walk(value, name, set())
    return found


def _plain_attributes(fusion: GatedCrossAttentionFusion) -> dict[str, object]:
    return {k: v for k, v in vars(fusion).items() if k not in ("_parameters", "_buffers", "_modules")}


def test_calls_leave_no_media_and_no_hooks_on_the_modules():
    """Media are a per-call input: after a forward, a generate, or a call that fails inside the
    decoder, the fusion holds no tensor outside its parameters, its plain attributes are the ones it
    had, and every hook a call registered is gone; the decoder alone is still refused."""
    dec = _decoder("llama")
    fusion = _fusion(dec, every_n_layers=2)
    _set_gates(fusion, 1.0)
    tok, img = dec.tokenizer, fusion.image_token_id
    ids, mask = _batch([_ids(tok, img, None, "a cat"), _ids(tok, img, "hi ", None, "x")], tok.pad_token_id)
    media, media_mask = torch.randn(2, 1, Q, D_VIS), torch.ones(2, 1, dtype=torch.bool)
    hooks, attributes = _pre_hook_counts(dec), _plain_attributes(fusion)
    assert _tensors_outside_parameters(fusion) == []

    def unchanged():
        assert _pre_hook_counts(dec) == hooks
        assert _plain_attributes(fusion).keys() == attributes.keys()
        assert all(_plain_attributes(fusion)[k] is v or _plain_attributes(fusion)[k] == v
                   for k, v in attributes.items())
        assert _tensors_outside_parameters(fusion) == []
        with pytest.raises(RuntimeError, match="through the fusion"):
            dec(inputs_embeds=torch.randn(1, 3, D))

    during = []  # ... nor while a call runs: the media reach the blocks only through the call's own hooks

    def look(module, args, kwargs):
        during.append(_tensors_outside_parameters(fusion))

    watch = dec.decoder_layers()[-1].register_forward_pre_hook(look, with_kwargs=True)
    hooks = _pre_hook_counts(dec)
    with torch.no_grad():
        fusion(dec, ids, mask, media, media_mask)
    assert during == [[]]
    unchanged()
    for use_cache in (True, False):
        _generate_greedy(fusion, dec, ids, mask, media, media_mask, 3, use_cache=use_cache)
        unchanged()
    fusion.generate(dec, ids, mask, media, media_mask, max_new_tokens=2, num_beams=2, do_sample=False)
    unchanged()
    assert len(during) > 1 and not any(during)
    watch.remove()
    hooks = _pre_hook_counts(dec)

    # a call that fails inside the decoder (after the fusion hooked its blocks in)
    def fail(module, args, kwargs):
        raise ValueError("a layer failed")

    failing = dec.decoder_layers()[-1].register_forward_pre_hook(fail, with_kwargs=True)
    counts = _pre_hook_counts(dec)
    try:
        with pytest.raises(ValueError, match="a layer failed"), torch.no_grad():
            fusion(dec, ids, mask, media, media_mask)
        assert _pre_hook_counts(dec) == counts
        with pytest.raises(ValueError, match="a layer failed"):
            _generate_greedy(fusion, dec, ids, mask, media, media_mask, 2)
        assert _pre_hook_counts(dec) == counts
    finally:
        failing.remove()
    unchanged()
    with torch.no_grad():  # and the next call works as before
        assert fusion(dec, ids, mask, media, media_mask).logits.shape[:2] == ids.shape


@pytest.mark.parametrize("inner", ["forward", "generate"])
def test_a_fusion_call_inside_another_is_refused(inner):
    dec = _decoder("llama")
    fusion = _fusion(dec, every_n_layers=2)
    ids = torch.tensor([_ids(dec.tokenizer, fusion.image_token_id, None, "a cat")])
    mask, media, media_mask = torch.ones_like(ids), torch.randn(1, 1, Q, D_VIS), torch.ones(1, 1, dtype=torch.bool)
    hooks = _pre_hook_counts(dec)
    calls = []

    def nested(module, args, kwargs):  # runs inside the outer call, before its first layer
        if not calls:
            calls.append(inner)
            if inner == "forward":
                fusion(dec, ids, mask, media, media_mask)
            else:
                _generate_greedy(fusion, dec, ids, mask, media, media_mask, 1)

    handle = dec.decoder_layers()[0].register_forward_pre_hook(nested, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="while another fusion call is running"), torch.no_grad():
            fusion(dec, ids, mask, media, media_mask)
    finally:
        handle.remove()
    assert calls == [inner] and _pre_hook_counts(dec) == hooks
    with torch.no_grad():
        fusion(dec, ids, mask, media, media_mask)


def test_markers_must_match_images():
    dec = _decoder("llama")
    fusion = _fusion(dec)
    ids = torch.tensor([_ids(dec.tokenizer, fusion.image_token_id, None, "ab", None)])
    with pytest.raises(VlmkitError, match="2 <image> tokens but 1 images"):
        fusion(dec, ids, torch.ones_like(ids), torch.randn(1, 2, Q, D_VIS), torch.tensor([[True, False]]))


# ---------------------------------------------------------------------------- media in the model
def test_model_tokens_see_their_image_and_not_later_ones():
    dec = _decoder("llama")
    fusion = _fusion(dec, every_n_layers=1)
    _set_gates(fusion, 1.0)
    img = fusion.image_token_id
    tok = dec.tokenizer
    pieces = ["intro ", None, "one ", None, "two ", None, "three"]
    ids = torch.tensor([_ids(tok, img, *pieces)])
    index = (ids == img).cumsum(1)[0]
    mask = torch.ones_like(ids)
    media_mask = torch.ones(1, 3, dtype=torch.bool)
    torch.manual_seed(5)
    media = torch.randn(1, 3, Q, D_VIS)

    def logits(m):
        with torch.no_grad():
            return fusion(dec, ids, mask, m, media_mask).logits[0]

    base = logits(media)
    for k in (1, 2, 3):
        other = media.clone()
        other[0, k - 1] = torch.randn(Q, D_VIS)
        changed = (logits(other) - base).abs().amax(-1) > 0
        assert not changed[index < k].any()  # earlier text: another (later) image changed
        assert changed[index == k].all()  # the image's own tokens: their immediate image changed
    everything = torch.randn(1, 3, Q, D_VIS)
    assert torch.equal(logits(everything)[index == 0], base[index == 0])  # text before the first image


# ------------------------------------------------------------------------------------ generation
@pytest.fixture(scope="module")
def gen_setup():
    dec = _decoder("llama")
    fusion = _fusion(dec, every_n_layers=2)
    _set_gates(fusion, 1.0)
    tok, img = dec.tokenizer, fusion.image_token_id
    ids, mask = _batch([_ids(tok, img, None, "a cat and ", None, "a dog:"), _ids(tok, img, None, "red:")],
                       tok.pad_token_id, side="left")
    torch.manual_seed(6)
    media = torch.randn(2, 2, Q, D_VIS) * 3
    media_mask = torch.tensor([[True, True], [True, False]])
    return dec, fusion, ids, mask, media, media_mask


def _full_forward_logits(fusion, dec, ids, mask, media, media_mask):
    """One uncached forward over whole sequences, with generate's left-padding position ids."""
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return fusion(dec, ids, mask, media, media_mask, position_ids=position_ids).logits


def test_cached_generation_keeps_the_last_image(gen_setup):
    dec, fusion, ids, mask, media, media_mask = gen_setup
    new = 8
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, suppress_tokens=[fusion.image_token_id])
    steps: list[torch.Tensor] = []
    handle = dec.model.register_forward_hook(lambda m, a, k, out: steps.append(out.logits[:, -1].clone()),
                                             with_kwargs=True)
    try:
        cached = fusion.generate(dec, ids, mask, media, media_mask, use_cache=True, **kw)
    finally:
        handle.remove()
    uncached = fusion.generate(dec, ids, mask, media, media_mask, use_cache=False, **kw)
    assert cached.shape == (2, new)
    assert torch.equal(cached, uncached)
    # every cached step's logits = those of one uncached forward over the whole sequence, where each
    # generated token's image index is its row's image count: new tokens attend to the last image
    full = torch.cat([ids, cached], 1)
    full_mask = torch.cat([mask, torch.ones_like(cached)], 1)
    ref = _full_forward_logits(fusion, dec, full, full_mask, media, media_mask)
    L = ids.shape[1]
    assert len(steps) == new
    for s, step in enumerate(steps):
        assert (step - ref[:, L - 1 + s]).abs().max().item() <= 1e-4, s
    # ... and the image matters there: another last image changes the generated steps' logits
    other = media.clone()
    other[0, 1] = torch.randn(Q, D_VIS) * 3
    other[1, 0] = torch.randn(Q, D_VIS) * 3
    moved = _full_forward_logits(fusion, dec, full, full_mask, other, media_mask)
    assert ((moved[:, L:] - ref[:, L:]).abs().amax(-1) > 1e-3).all()


def test_beam_search_returns_new_tokens(gen_setup):
    dec, fusion, ids, mask, media, media_mask = gen_setup
    kw = dict(max_new_tokens=5, min_new_tokens=5, num_beams=2, do_sample=False, suppress_tokens=[fusion.image_token_id])
    cached = fusion.generate(dec, ids, mask, media, media_mask, use_cache=True, **kw)
    uncached = fusion.generate(dec, ids, mask, media, media_mask, use_cache=False, **kw)
    assert cached.shape == (2, 5)
    assert torch.equal(cached, uncached)
    # each row's beams read that row's images: the batch gives what each prompt gives alone
    for row in range(2):
        keep, n_img = mask[row].bool(), int(media_mask[row].sum())
        alone = fusion.generate(dec, ids[row : row + 1, keep], mask[row : row + 1, keep], media[row : row + 1, :n_img],
                                media_mask[row : row + 1, :n_img], **kw)
        assert torch.equal(alone[0], cached[row]), row
    two = fusion.generate(dec, ids, mask, media, media_mask, num_return_sequences=2, **kw)
    assert two.shape == (4, 5)


def _generate_greedy(fusion, dec, ids, mask, media, media_mask, new, **kw):
    return fusion.generate(dec, ids, mask, media, media_mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           suppress_tokens=[fusion.image_token_id], **kw)


_CACHE_KEYWORDS = ("cache", "past_key_values")  # transformers >= 5.24, and before


def test_a_cache_keyword_the_fusion_does_not_know_changes_nothing(gen_setup, monkeypatch):
    """A future transformers that hands the cache to the model under a new keyword: the fusion
    reads no cache keyword, so cached generation still equals uncached, token for token."""
    dec, fusion, ids, mask, media, media_mask = gen_setup
    model = dec.generation_module()
    renamed = []

    def rename(module, args, kwargs):  # runs before the fusion's hook (registered earlier)
        for key in _CACHE_KEYWORDS:
            if kwargs.get(key) is not None:
                kwargs["kv_store_of_a_future_version"] = kwargs.pop(key)
                renamed.append(key)
        return args, kwargs

    original_forward = model.forward

    def forward_with_the_name_restored(*args, **kwargs):  # runs after every pre-hook
        store = kwargs.pop("kv_store_of_a_future_version", None)
        if store is not None:
            kwargs[renamed[-1]] = store
        return original_forward(*args, **kwargs)

    handle = model.register_forward_pre_hook(rename, with_kwargs=True)
    monkeypatch.setattr(model, "forward", forward_with_the_name_restored)
    try:
        cached = _generate_greedy(fusion, dec, ids, mask, media, media_mask, 6, use_cache=True)
    finally:
        handle.remove()
        monkeypatch.undo()
    assert renamed, "the test did not see transformers pass a cache"
    uncached = _generate_greedy(fusion, dec, ids, mask, media, media_mask, 6, use_cache=False)
    assert torch.equal(cached, uncached)


def test_generation_that_drops_its_cache_fails_instead_of_going_blind(gen_setup):
    """A transformers that stops continuing from the cache (runs the whole sequence again at a step
    after the first while the call asked for a cache) stops generation with an error."""
    dec, fusion, ids, mask, media, media_mask = gen_setup
    model = dec.generation_module()
    seen: list[torch.Tensor] = []

    def whole_sequence_again(module, args, kwargs):
        chunk = kwargs["input_ids"]
        if seen:
            kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KEYWORDS + ("position_ids", "cache_position")}
            kwargs["input_ids"] = torch.cat([*seen, chunk], 1)
        seen.append(chunk)
        return args, kwargs

    before = _pre_hook_counts(dec)
    handle = model.register_forward_pre_hook(whole_sequence_again, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="whole sequence .* again although the call asked for a KV cache"):
            _generate_greedy(fusion, dec, ids, mask, media, media_mask, 4, use_cache=True)
    finally:
        handle.remove()
    assert _pre_hook_counts(dec) == before  # the failed call left nothing behind: the next one works
    assert _generate_greedy(fusion, dec, ids, mask, media, media_mask, 2).shape == (2, 2)


def test_generation_steps_accept_only_whole_prompts_and_one_token_steps():
    from vlmkit.connectors.gated_cross_attention import GenerationSteps

    cached = GenerationSteps(prompt_len=5, use_cache=True)
    assert [cached.advance(5), cached.advance(1), cached.advance(1)] == [0, 5, 6]
    with pytest.raises(RuntimeError, match="expected 1 new tokens after the 7 cached"):
        cached.advance(2)
    uncached = GenerationSteps(prompt_len=5, use_cache=False)
    assert [uncached.advance(5), uncached.advance(6), uncached.advance(7)] == [0, 0, 0]
    with pytest.raises(RuntimeError, match="whole sequence of 8 tokens"):
        uncached.advance(1)
    with pytest.raises(RuntimeError, match="no chunked prefill"):
        GenerationSteps(prompt_len=5, use_cache=True).advance(3)


# ------------------------------------------------------------------------------------- gradients
def test_gradients_reach_blocks_and_not_a_frozen_decoder():
    dec = _decoder("llama")
    fusion = _fusion(dec, every_n_layers=2).train()
    dec.requires_grad_(False)
    img, tok = fusion.image_token_id, dec.tokenizer
    ids = torch.tensor([_ids(tok, img, None, "a cat ", None, "a dog")])
    labels = ids.masked_fill(ids == img, IGNORE)  # as the collator writes them: images untrained
    media = torch.randn(1, 2, Q, D_VIS, requires_grad=True)
    media_mask = torch.ones(1, 2, dtype=torch.bool)

    # at init only the gates get gradient (everything inside is multiplied by tanh(0) = 0), and the
    # media receive none: the Flamingo start
    answer_loss(fusion(dec, ids, torch.ones_like(ids), media, media_mask).logits, labels).backward()
    for name, p in fusion.named_parameters():
        assert p.grad is not None, name
        assert (p.grad.abs().sum() > 0) == name.endswith("_gate"), name
    assert media.grad is None or not media.grad.any()
    assert all(p.grad is None for p in dec.parameters())

    # with open gates every block parameter and the media get gradient
    fusion.zero_grad()
    _set_gates(fusion, 0.5)
    media.grad = None
    answer_loss(fusion(dec, ids, torch.ones_like(ids), media, media_mask).logits, labels).backward()
    for name, p in fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert media.grad.abs().sum() > 0
    assert all(p.grad is None for p in dec.parameters())


def test_image_positions_carry_no_loss():
    """The collator leaves the <image> positions untrained, and the training step's loss (the one
    definition, not the fusion's) is the cross-entropy of the other next tokens."""
    dec = _decoder("llama")
    fusion = _fusion(dec)
    img = fusion.image_token_id
    sample = Sample("s", images=[Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), "white")], segments=[("<image>ab", False), ("<image>cd", True)])
    col = Collator(dec.tokenizer, Preprocess(image_size=8, mean=(0.5,) * 3, std=(0.5,) * 3), "<image>", lambda frames=1: 1)
    batch = col([sample])
    ids, labels = batch["input_ids"], batch["labels"]
    assert int((ids == img).sum()) == 2 and not bool((labels[ids == img] != IGNORE).any())
    media, media_mask = torch.randn(1, 2, Q, D_VIS), torch.ones(1, 2, dtype=torch.bool)
    with torch.no_grad():
        logits = fusion(dec, ids, batch["attention_mask"], media, media_mask).logits
        target = ids[0, 1:].masked_fill(labels[0, 1:] == IGNORE, IGNORE)
        want = nn.functional.cross_entropy(logits[0, :-1], target, ignore_index=IGNORE)
    assert int((target != IGNORE).sum()) == int((labels != IGNORE).sum()) > 0
    torch.testing.assert_close(answer_loss(logits, labels), want)


# ----------------------------------------------------------------------------------- composition
def test_recipe_builds_trains_and_generates(tmp_path):
    def mutate(data):
        data["model"]["fusion"] = {"name": "gated_cross_attention", "every_n_layers": 1, "heads": 2, "dim_head": 16}

    model = build_model(resolved_toy(tmp_path, mutate))
    enc_width = model.encoder.width
    assert model.connector.width_out == enc_width  # the blocks read the encoder width
    assert model.placeholder_tokens() == 1
    n_layers = len(model.decoder.decoder_layers())
    assert len(model.fusion.blocks) == n_layers
    assert all(not n.startswith("decoder") for n, _ in model.fusion.named_parameters())

    data = ToyCaptions(ToyCaptionsConfig(num_samples=3, image_size=32))
    a, b = data[0], data[1]
    two = Sample("two", images=[a.images[0], b.images[0]],
                 segments=[("<image>first ", False), ("<image>second", False), (" both shapes", True)])
    col = Collator(model.decoder.tokenizer, model.encoder.preprocess, "<image>", model.placeholder_tokens())
    batch = col([two, data[2]])
    assert int((batch["input_ids"] == model.fusion.image_token_id).sum()) == 3
    tensors = {k: v for k, v in batch.items() if k != "ids"}
    model.train()
    model.decoder.requires_grad_(False)
    _set_gates(model.fusion, 0.5)
    loss = answer_loss(model(**{k: v for k, v in tensors.items() if k != "labels"}).logits, tensors["labels"])
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.fusion.parameters())
    assert all(p.grad is not None for p in model.connector.parameters())

    model.eval()
    for s in (two, data[2]):
        s.segments = [seg for seg in s.segments if not seg[1]]
    left = Collator(model.decoder.tokenizer, model.encoder.preprocess, "<image>", 1, padding_side="left")
    prompt = left([two, data[2]])
    new = model.generate(prompt["input_ids"], prompt["attention_mask"], prompt["vision_x"], prompt["media_mask"],
                         max_new_tokens=4, do_sample=False)
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 4


def test_gate_init_sets_every_gate_and_defaults_to_flamingos_zero():
    assert GatedCrossAttentionConfig().gate_init == 0.0
    dec = _decoder("llama")
    fusion = _fusion(dec, every_n_layers=2, gate_init=0.25)
    gates = [float(g) for b in fusion.blocks for g in (b.attn_gate, b.ff_gate)]
    assert gates == [0.25] * (2 * len(fusion.blocks))
    block = GatedCrossAttentionBlock(8, 4, heads=2, dim_head=4, gate_init=-0.5)
    assert float(block.attn_gate) == float(block.ff_gate) == -0.5
