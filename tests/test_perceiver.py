"""The ``perceiver`` connector: parity with OpenFlamingo's resampler, paper-scale size, shapes,
gradients, errors and composition in a recipe."""

from __future__ import annotations

import re

import pytest
import torch

from tiny import resolved_toy
from vlmkit.core.engine.step import answer_loss
from vlmkit.connectors.perceiver import PerceiverConfig, PerceiverResampler
from vlmkit.core.compose import build_model
from vlmkit.core.data.collate import Collator
from tiny import ToyCaptions, ToyCaptionsConfig  # rendered with llava_plain, as the toy recipe does
from vlmkit.core.errors import RecipeError, VlmkitError
from vlmkit.core.interfaces import Sample

of_helpers = pytest.importorskip("open_flamingo.src.helpers")

TINY = dict(num_latents=5, depth=2, heads=3, dim_head=8, ff_mult=2)

# OpenFlamingo key -> vlmkit key: the importer's table
from vlmkit.core.importers.openflamingo import PERCEIVER_KEYS as _KEY_MAP  # noqa: E402


def _map_key(key: str) -> str:
    hits = [re.sub(pat, rep, key) for pat, rep in _KEY_MAP if re.match(pat, key)]
    assert len(hits) == 1, f"OpenFlamingo key {key!r} matched {len(hits)} rules"
    return hits[0]


def _pair(width=12, max_num_frames=None, max_num_media=None, seed=0):
    """An OpenFlamingo resampler with perturbed weights and ours with the same weights copied in."""
    torch.manual_seed(seed)
    ref = of_helpers.PerceiverResampler(
        dim=width, depth=TINY["depth"], dim_head=TINY["dim_head"], heads=TINY["heads"],
        num_latents=TINY["num_latents"], max_num_media=max_num_media, max_num_frames=max_num_frames,
        ff_mult=TINY["ff_mult"],
    ).eval()
    with torch.no_grad():  # LayerNorms start at 1/0: perturb everything so every tensor matters
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = PerceiverResampler(PerceiverConfig(width_in=width, width_out=width, max_num_frames=max_num_frames,
                                              max_num_media=max_num_media, **TINY)).eval()
    target = ours.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in ref.state_dict().items():
        new = _map_key(key)
        assert new in target, f"{key} -> {new} is not a vlmkit key"
        assert new not in mapped, f"{new} is mapped twice"
        mapped[new] = value.reshape(target[new].shape)  # media_time_embs is (M, 1, d), ours (M, d)
    assert set(mapped) == set(target), f"unmapped vlmkit keys: {set(target) - set(mapped)}"
    ours.load_state_dict(mapped, strict=True)
    return ref, ours


@pytest.mark.parametrize(
    "frames, max_frames, images, max_media",
    [(1, None, 1, None), (3, 4, 1, None), (2, None, 1, None), (1, None, 3, 4), (2, 3, 3, 3)],
    ids=["F1", "F3_frame_embs", "F2_no_frame_embs", "T3_media_time", "F2_T3_both"],
)
def test_parity_with_open_flamingo(frames, max_frames, images, max_media):
    width, b, v = 12, 2, 7
    ref, ours = _pair(width, max_num_frames=max_frames, max_num_media=max_media)
    x = torch.randn(b, images, frames, v, width)  # OpenFlamingo layout (b, T, F, v, D)
    with torch.no_grad():
        expected = ref(x)  # (b, T, Q, D)
        positions = torch.arange(images).repeat(b)  # image index within its sample, batch-major
        got = ours(x.reshape(b * images, frames * v, width), num_frames=frames, media_positions=positions)
    assert got.shape == (b * images, TINY["num_latents"], width)
    diff = (got - expected.reshape(got.shape)).abs().max().item()
    print(f"parity F={frames} T={images} frame_embs={max_frames} media_time={max_media}: max|diff|={diff:.3e}")
    assert diff <= 1e-5


def test_paper_scale_parameter_count_matches_open_flamingo():
    with torch.device("meta"):
        ours = PerceiverResampler(PerceiverConfig(width_in=1024, width_out=1024))
        ref = of_helpers.PerceiverResampler(dim=1024, depth=6, dim_head=64, heads=8, num_latents=64, ff_mult=4)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    print(f"perceiver parameters at d=1024: vlmkit {n_ours:,}, OpenFlamingo {n_ref:,}")
    assert n_ours == n_ref
    assert abs(n_ours - 63e6) / 63e6 < 0.01
    assert ours.proj is None


def test_shapes_and_projection_only_when_widths_differ():
    same = PerceiverResampler(PerceiverConfig(width_in=16, width_out=16, **TINY))
    assert same.proj is None
    assert not any(isinstance(m, torch.nn.Linear) and m.out_features == 16 and m.in_features == 16
                   for m in same.modules())  # no 16 -> 16 projection anywhere
    diff = PerceiverResampler(PerceiverConfig(width_in=16, width_out=24, **TINY))
    assert isinstance(diff.proj, torch.nn.Linear) and diff.proj.weight.shape == (24, 16)
    x = torch.randn(3, 2 * 9, 16)
    assert same(x, num_frames=2).shape == (3, 5, 16)
    out = diff(x, num_frames=2)
    assert out.shape == (3, 5, 24)
    assert diff.num_queries(9, num_frames=2) == 5 == same.num_queries(100)
    # the projection is applied to the normalised latents
    with torch.no_grad():
        diff.proj.weight.zero_()
        diff.proj.bias.fill_(0.5)
    torch.testing.assert_close(diff(x), torch.full((3, 5, 24), 0.5))


def test_frames_merge_into_keys_and_embeddings_tell_them_apart():
    x = torch.randn(2, 3 * 4, 16)  # 3 frames of 4 tokens
    swapped = x.reshape(2, 3, 4, 16).flip(1).reshape(2, 12, 16)
    plain = PerceiverResampler(PerceiverConfig(width_in=16, width_out=16, **TINY)).eval()
    with torch.no_grad():  # no frame embeddings: attention over keys ignores their order
        torch.testing.assert_close(plain(x, num_frames=3), plain(swapped, num_frames=3), atol=1e-5, rtol=1e-5)
    framed = PerceiverResampler(PerceiverConfig(width_in=16, width_out=16, max_num_frames=3, **TINY)).eval()
    with torch.no_grad():
        assert not torch.allclose(framed(x, num_frames=3), framed(swapped, num_frames=3), atol=1e-3)
    timed = PerceiverResampler(PerceiverConfig(width_in=16, width_out=16, max_num_media=2, **TINY)).eval()
    same_image = x[:1].expand(2, -1, -1)
    with torch.no_grad():
        out = timed(same_image, media_positions=torch.tensor([0, 1]))
        assert not torch.allclose(out[0], out[1], atol=1e-3)  # same image, different position in its sample
        again = timed(same_image, media_positions=torch.tensor([1, 1]))
    torch.testing.assert_close(again[0], again[1])


def test_gradients_reach_every_parameter_and_none_when_frozen():
    model = PerceiverResampler(PerceiverConfig(width_in=16, width_out=24, max_num_frames=2, max_num_media=2, **TINY))
    x = torch.randn(3, 2 * 4, 16)
    positions = torch.tensor([0, 1, 0])
    model(x, num_frames=2, media_positions=positions).square().mean().backward()
    names = [n for n, _ in model.named_parameters()]
    assert {"latents", "frame_embeddings", "media_time_embeddings", "proj.weight"} <= set(names)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"
    frozen = PerceiverResampler(PerceiverConfig(width_in=16, width_out=16, **TINY)).requires_grad_(False)
    x = torch.randn(2, 4, 16, requires_grad=True)
    frozen(x).sum().backward()
    assert all(p.grad is None for p in frozen.parameters())
    assert x.grad is not None  # the input still gets its gradient through the frozen resampler


def test_forward_errors_name_the_recipe_field():
    model = PerceiverResampler(PerceiverConfig(width_in=16, width_out=16, max_num_frames=2, max_num_media=2, **TINY))
    with pytest.raises(VlmkitError, match=r"model\.connector\.max_num_frames.*3 frames.*at most 2"):
        model(torch.randn(1, 3 * 4, 16), num_frames=3, media_positions=torch.tensor([0]))
    with pytest.raises(VlmkitError, match=r"model\.connector\.max_num_media.*3 images.*at most 2"):
        model(torch.randn(2, 4, 16), media_positions=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="media_positions"):
        model(torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match="num_frames=3"):
        model(torch.randn(1, 8, 16), num_frames=3, media_positions=torch.tensor([0]))


def test_recipe_errors_at_build(tmp_path):
    def bad_heads(data):
        data["model"]["connector"] = {"name": "perceiver", "heads": 0}

    with pytest.raises(RecipeError, match=r"model\.connector\.heads"):
        resolved_toy(tmp_path, bad_heads)

    def typo(data):
        data["model"]["connector"] = {"name": "perceiver", "num_latent": 8}

    with pytest.raises(RecipeError, match=r"model\.connector\.num_latent.*num_latents"):
        resolved_toy(tmp_path, typo)


def _samples():
    data = ToyCaptions(ToyCaptionsConfig(num_samples=3, image_size=32))
    a, b = data[0], data[1]
    two = Sample("two", images=[a.images[0], b.images[0]],
                 segments=[("<image>first ", False), ("<image>second", False), (" both shapes", True)])
    return [two, data[2]]


@pytest.mark.parametrize("extra", [{}, {"max_num_media": 2}], ids=["plain", "media_time"])
def test_composes_with_prefix_fusion(tmp_path, extra):
    def mutate(data):
        data["model"]["connector"] = {"name": "perceiver", "num_latents": 8, "depth": 2, "heads": 2, "dim_head": 16} | extra

    model = build_model(resolved_toy(tmp_path, mutate))
    conn = model.connector
    assert isinstance(conn, PerceiverResampler)
    assert (conn.width_in, conn.width_out) == (32, 64)  # timm ViT width -> tiny Llama width
    assert conn.proj is not None and conn.proj.weight.shape == (64, 32)
    assert model.placeholder_tokens() == 8
    col = Collator(model.decoder.tokenizer, model.encoder.preprocess, "<image>", model.placeholder_tokens())
    batch = {k: v for k, v in col(_samples()).items() if k != "ids"}
    assert int((batch["input_ids"] == col.image_token_id).sum()) == 3 * 8
    model.encoder.requires_grad_(False)
    loss = answer_loss(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in conn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for connector.{name}"
    assert all(p.grad is None for p in model.encoder.parameters())
    # the model hands each image its index within its sample: (sample 0: 0, 1; sample 1: 0)
    with torch.no_grad():
        media = model.encode_media(batch["vision_x"], batch["media_mask"])
        real = batch["vision_x"][batch["media_mask"]][:, 0]  # (3, C, H, W), one frame each
        direct = conn(model.encoder(real), media_positions=torch.tensor([0, 1, 0]))
    torch.testing.assert_close(media[batch["media_mask"]], direct)


def test_token_position_embeddings_make_the_perceiver_see_where_tokens_are():
    """Without them the resampler is blind to token order (a CNN map's left and right look alike);
    with max_num_tokens each position gets its own embedding, per frame."""
    torch.manual_seed(0)
    feats = torch.randn(2, 2 * 9, 16)  # 2 frames of 9 tokens
    perm = torch.cat([torch.randperm(9), 9 + torch.randperm(9)])
    plain = PerceiverResampler(PerceiverConfig(width_in=16, width_out=16, num_latents=4, depth=1, heads=2, dim_head=8)).eval()
    assert torch.allclose(plain(feats, num_frames=2), plain(feats[:, perm], num_frames=2), atol=1e-6)
    placed = PerceiverResampler(PerceiverConfig(width_in=16, width_out=16, num_latents=4, depth=1, heads=2, dim_head=8,
                                                max_num_tokens=9)).eval()
    assert not torch.allclose(placed(feats, num_frames=2), placed(feats[:, perm], num_frames=2), atol=1e-3)
    with pytest.raises(VlmkitError, match="max_num_tokens: the encoder gives 18 tokens per frame"):
        placed(feats, num_frames=1)


def test_latent_init_std_scales_the_latents_and_lets_the_image_through():
    """OpenFlamingo's unit-variance latents dominate what the first layers read from the image;
    ``latent_init_std`` scales them (default 1.0: unchanged)."""
    torch.manual_seed(0)
    default = PerceiverResampler(PerceiverConfig(width_in=64, width_out=64, num_latents=256, depth=1, heads=2, dim_head=16))
    torch.manual_seed(0)
    small = PerceiverResampler(PerceiverConfig(width_in=64, width_out=64, num_latents=256, depth=1, heads=2, dim_head=16,
                                               latent_init_std=0.02))
    assert abs(default.latents.std().item() - 1.0) < 0.02
    torch.testing.assert_close(small.latents, default.latents * 0.02)
    x = torch.randn(6, 9, 64)

    def spread(p):  # mean distance of each image's output to the images' mean, relative to the output's norm
        with torch.no_grad():
            out = p(x)
        return ((out - out.mean(0)).norm(dim=-1).mean() / out.norm(dim=-1).mean()).item()

    assert spread(small) > 3 * spread(default)
    with pytest.raises(Exception, match="latent_init_std"):
        PerceiverConfig(latent_init_std=0.0)
