"""Otter paper fidelity (REFERENCE 1.1, 1.6): the ``otter_mimicit`` paper profile, resolved as
``recipes show otter_mimicit --profile paper`` resolves it, and the code paths it selects.

- item 3: the open_clip encoder gives the last block's tokens WITHOUT ``ln_post`` (``ln_post: false``),
  what OpenFlamingo (open_clip 2.16-2.20) and Otter fed the perceiver;
- item 4: a spot-the-difference record's two images are the frames of ONE media behind one
  ``<image>`` (``images_as: frames``), not two media;
- item 5: every listed in-context example is kept (no cap of 3).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmkit.core.data.collate import Collator
from vlmkit.datasets.mimicit import MimicIT, MimicITConfig
from vlmkit.templates.otter import OtterTemplate
from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import Preprocess
from vlmkit.core.recipe.loader import load_recipe
from vlmkit.core.registry import get_registry
from vlmkit.decoders.byte_tokenizer import byte_level_tokenizer

open_clip = pytest.importorskip("open_clip")
from vlmkit.encoders.open_clip import OpenClipEncoder, OpenClipEncoderConfig  # noqa: E402

# a tiny open_clip ViT (32 px, 8 px patches: 16 patch tokens + CLS, width 32) built offline
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"width": 16, "heads": 2, "layers": 1, "vocab_size": 64, "context_length": 8},
}
OTTER_TOKENS = ("<image>", "<answer>", "<|endofchunk|>")


@pytest.fixture(scope="module")
def paper():
    """The paper profile as the ``recipes show`` command resolves and validates it."""
    return load_recipe("otter_mimicit", "paper", registry=get_registry())


# ------------------------------------------------------------------------------------ fixtures
def _png_b64(colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _write_mimicit(folder: Path, prefix: str, data: dict, images: dict[str, tuple[int, int, int]],
                   train: dict | None) -> dict[str, str]:
    """A MIMIC-IT subset in the on-disk format: ``XX_instructions.json``, legacy ``XX.json`` images
    (image id -> base64 PNG), ``XX_train.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"instructions": folder / f"{prefix}_instructions.json", "images": folder / f"{prefix}.json"}
    paths["instructions"].write_text(json.dumps({"meta": {"version": "0.0.1"}, "data": data}))
    paths["images"].write_text(json.dumps({k: _png_b64(v) for k, v in images.items()}))
    if train is not None:
        paths["train_config"] = folder / f"{prefix}_train.json"
        paths["train_config"].write_text(json.dumps(train))
    return {k: str(v) for k, v in paths.items()}


def _tokenizer():
    tok = byte_level_tokenizer()
    tok.add_tokens(list(OTTER_TOKENS), special_tokens=True)
    return tok


def _render(record):
    template = OtterTemplate(OtterTemplate.Config())
    return template.render(record, _tokenizer())


# ======================================================================== item 3: ln_post
def _last_block_output(encoder: OpenClipEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """The output of the tower's LAST residual block, taken independently of the encoder's code by a
    hook on ``visual.transformer.resblocks[-1]``: ``(N, 1 + grid**2, width)``, CLS first. Fails loudly
    if open_clip's ViT stops having this structure."""
    blocks = encoder.visual.transformer.resblocks
    assert len(blocks) == TINY_CLIP["vision_cfg"]["layers"]
    caught = []
    handle = blocks[-1].register_forward_hook(lambda module, args, output: caught.append(output))
    try:
        with torch.no_grad():
            encoder.visual(pixels)
    finally:
        handle.remove()
    assert len(caught) == 1
    out = caught[0]
    if out.shape[0] != pixels.shape[0]:  # a sequence-first transformer
        out = out.transpose(0, 1)
    assert out.shape == (pixels.shape[0], 17, 32)
    return out


def test_item3_open_clip_tokens_are_the_last_layer_without_ln_post(paper):
    # the paper profile selects the tokens OpenFlamingo and Otter fed the perceiver, explicitly
    encoder = paper.components["encoder"]
    assert encoder.name == "open_clip" and encoder.config.model_name == "ViT-L-14"
    assert encoder.config.ln_post is False
    assert "ln_post" in paper.data["model"]["encoder"]  # stated in the recipe, not left to a default
    # the option's default keeps open_clip 3.x's tokens after ln_post (mPLUG-Owl reads those)
    assert OpenClipEncoderConfig(model_name="ViT-B-32").ln_post is True

    torch.manual_seed(0)
    raw = OpenClipEncoder(OpenClipEncoderConfig(model_name="ViT-B-32", model_cfg=TINY_CLIP, ln_post=False)).eval()
    raw_cls = OpenClipEncoder(OpenClipEncoderConfig(model_name="ViT-B-32", model_cfg=TINY_CLIP, ln_post=False,
                                                    select_feature="cls_patch")).eval()
    normed = OpenClipEncoder(OpenClipEncoderConfig(model_name="ViT-B-32", model_cfg=TINY_CLIP)).eval()
    with torch.no_grad():  # a non-trivial final LayerNorm (its init is weight 1, bias 0)
        raw.visual.ln_post.weight.uniform_(0.5, 2.0)
        raw.visual.ln_post.bias.normal_()
    raw_cls.load_state_dict(raw.state_dict())
    normed.load_state_dict(raw.state_dict())

    pixels = torch.randn(2, 3, 32, 32)
    last = _last_block_output(raw, pixels)
    with torch.no_grad():
        out, out_cls, out_normed = raw(pixels), raw_cls(pixels), normed(pixels)
        after_ln = raw.visual.ln_post(last)
    assert out.shape == (2, 16, 32) and raw.num_tokens() == 16 and raw.width == 32
    torch.testing.assert_close(out, last[:, 1:])  # the patch tokens of the last block, as they are
    torch.testing.assert_close(out_cls, last)  # with cls_patch: the CLS token first, also without ln_post
    torch.testing.assert_close(out_normed, after_ln[:, 1:])  # the default: after ln_post
    assert (out - out_normed).abs().max() > 0.1  # the two really differ


def test_item3_ln_post_false_only_for_open_clip_vits(tmp_path):
    with pytest.raises(VlmkitError, match="ln_post"):
        OpenClipEncoder(OpenClipEncoderConfig(
            model_name="RN50", ln_post=False,
            model_cfg={"vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
                       "text_cfg": TINY_CLIP["text_cfg"], "embed_dim": 16},
        ))


# ============================================================== item 4: spot-the-difference
SD_DATA = {
    "SD_INS_00001": {"instruction": "What is different between the two images?", "answer": "The colour.",
                     "image_ids": ["SD_IMG_00001_1", "SD_IMG_00001_2"], "rel_ins_ids": ["SD_INS_00002"]},
    "SD_INS_00002": {"instruction": "Is anything the same?", "answer": "The size.",
                     "image_ids": ["SD_IMG_00001_1", "SD_IMG_00001_2"], "rel_ins_ids": []},
}
SD_IMAGES = {"SD_IMG_00001_1": (255, 0, 0), "SD_IMG_00001_2": (0, 0, 255)}


def test_item4_sd_pair_is_one_media_of_two_frames(paper, tmp_path):
    spec = paper.datasets["images"]
    assert "/MIMIC-IT/SD/" in str(spec.config.instructions) and "/MIMIC-IT/SD/" in str(spec.config.images)
    assert spec.config.images_as == "frames"
    assert paper.datasets["eval_images"].config.images_as == "frames"  # the SD validation split too

    paths = _write_mimicit(tmp_path / "SD", "SD", SD_DATA, SD_IMAGES, {"SD_INS_00001": ["SD_INS_00002"]})
    # the paper profile's own dataset config, pointed at the fixture
    config = spec.config.model_copy(update={k: Path(v) for k, v in paths.items()})
    record = MimicIT(config)[0]
    assert record.id == "SD_INS_00001" and len(record.query.media) == 1
    frames = record.query.media[0].frames
    assert [im.getpixel((0, 0)) for im in frames] == [(255, 0, 0), (0, 0, 255)]  # in image_ids order
    sample = _render(record)
    text = "".join(t for t, _ in sample.segments)
    assert text.count("<image>") == 1 and text.startswith("<image>User: Is anything the same? GPT:<answer>")
    assert len(sample.images) == 1 and len(sample.images[0]) == 2
    tok = _tokenizer()
    batch = Collator(tok, Preprocess(image_size=8, mean=(0, 0, 0), std=(1, 1, 1)), "<image>", 1)([sample])
    assert batch["vision_x"].shape == (1, 1, 2, 3, 8, 8)  # (B, T_img, F, C, H, W): one media, 2 frames

    # the other choice (the default for still images): two media, two markers
    separate = MimicIT(MimicITConfig(group="IMAGE_TEXT", **paths))[0]
    assert [len(m.frames) for m in separate.query.media] == [1, 1]
    text = "".join(t for t, _ in _render(separate).segments)
    assert text.count("<image>") == 2 and text.startswith("<image><image>User:")
    explicit = MimicIT(MimicITConfig(group="IMAGE_TEXT", images_as="media", **paths))[0]
    assert [m.id for m in explicit.query.media] == ["SD_IMG_00001_1", "SD_IMG_00001_2"]
    with pytest.raises(ValueError, match="images_as"):
        MimicITConfig(group="VIDEO_TEXT", images_as="media", **paths)


# ============================================================== item 5: in-context examples
def _dc_fixture(tmp_path: Path) -> dict[str, str]:
    """A DC-like (VIDEO_TEXT) subset: a query whose train config lists 7 related instructions."""
    frames = [f"DC_VID_00001_{f:04d}" for f in range(4)]
    data = {
        f"DC_INS_{i:05d}": {"instruction": f"Question {i}?", "answer": f"Answer {i}.", "image_ids": frames,
                            "rel_ins_ids": [f"DC_INS_{j:05d}" for j in range(1, 9) if j != i]}
        for i in range(1, 9)
    }
    related = [f"DC_INS_{j:05d}" for j in range(2, 9)]
    images = {f: (10 * k, 0, 0) for k, f in enumerate(frames)}
    return _write_mimicit(tmp_path / "DC", "DC", data, images, {"DC_INS_00001": related})


def test_item5_every_listed_in_context_example_is_kept(paper, tmp_path):
    paths = _dc_fixture(tmp_path)
    related = [f"DC_INS_{j:05d}" for j in range(2, 9)]
    assert len(related) == 7
    # the default: every listed id
    assert MimicITConfig(group="VIDEO_TEXT", **paths).max_context is None
    record = MimicIT(MimicITConfig(group="VIDEO_TEXT", num_frames=2, **paths))[0]
    assert [c.id for c in record.context] == related
    # an explicit cap keeps the last ones of the list
    capped = MimicIT(MimicITConfig(group="VIDEO_TEXT", num_frames=2, max_context=3, **paths))[0]
    assert [c.id for c in capped.context] == related[-3:]

    # the paper profile: no cap on any training entry, and the DC entry keeps all 7
    for alias in ("images", "in_context", "video"):
        assert paper.datasets[alias].config.max_context is None, alias
    spec = paper.datasets["video"]
    assert "/MIMIC-IT/DC/" in str(spec.config.instructions)
    config = spec.config.model_copy(update={k: Path(v) for k, v in paths.items()})
    record = MimicIT(config)[0]
    assert [c.id for c in record.context] == related and record.shared_media

    # too long for max_length: whole examples go, oldest first (the collator's job, unchanged)
    sample = _render(MimicIT(MimicITConfig(group="VIDEO_TEXT", num_frames=2, **paths))[0])
    assert len(sample.units) == 7
    tok = _tokenizer()
    pre = Preprocess(image_size=8, mean=(0, 0, 0), std=(1, 1, 1))
    full = len(Collator(tok, pre, "<image>", 1).encode(sample)[0])
    collator = Collator(tok, pre, "<image>", 1, max_length=full - 1)
    batch = collator([sample])
    assert collator.stats["dropped_examples"] == 1
    kept = tok.decode(batch["input_ids"][0])
    assert "Question 2?" not in kept and "Question 3?" in kept and "Question 1?" in kept
