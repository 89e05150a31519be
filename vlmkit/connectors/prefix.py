"""The ``prefix`` fusion (LLaVA, mPLUG-Owl, BLIP-2): connector tokens replace the ``<image>``
placeholder tokens of the input embeddings.

The collator writes each image as ``Q`` consecutive ``<image>`` tokens (``Q`` = the connector's
tokens per image, :meth:`PrefixFusion.placeholder_tokens`); this fusion fills those positions, in
order, with the real images' tokens. Positions are found by token id, so left and right padding
both work, and those positions never carry a loss.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import IMAGE_TOKEN, Fusion, FusionConfig, LanguageDecoder


class PrefixConfig(FusionConfig):
    pass


class PrefixFusion(Fusion):
    """Connector tokens replace the <image> placeholders of the input embeddings."""

    Config = PrefixConfig

    def __init__(self, config: PrefixConfig):
        super().__init__(config)
        self.image_token_id: int | None = None

    def attach(self, decoder: LanguageDecoder, media_width: int) -> None:
        if media_width != decoder.width:
            raise VlmkitError(
                f"model.connector.width_out: the connector outputs width {media_width} but fusion 'prefix' puts its "
                f"tokens into the input embeddings of the decoder, of width {decoder.width}; remove width_out to wire "
                "it automatically"
            )
        ids = decoder.add_special_tokens([IMAGE_TOKEN])
        self.image_token_id = ids[IMAGE_TOKEN]

    def placeholder_tokens(self, tokens_per_image: int) -> int:
        return tokens_per_image

    def _embed(
        self, decoder: LanguageDecoder, input_ids: torch.Tensor, media: torch.Tensor, media_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings ``(B, L, d)`` with the image tokens in place, and the image positions ``(B, L)``."""
        is_image = input_ids == self.image_token_id  # (B, L)
        embeds = decoder.get_input_embeddings()(input_ids)  # (B, L, d)
        feats = media[media_mask].reshape(-1, media.shape[-1])  # (images * Q, d), batch-major order
        if int(is_image.sum()) != feats.shape[0]:
            raise VlmkitError(
                f"the batch has {int(is_image.sum())} <image> token positions but {int(media_mask.sum())} images x "
                f"{media.shape[2]} tokens = {feats.shape[0]} image tokens; every <image> marker must stand for one image"
            )
        return embeds.masked_scatter(is_image.unsqueeze(-1), feats.to(embeds.dtype)), is_image

    def forward(
        self,
        decoder: LanguageDecoder,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: torch.Tensor,
        media_mask: torch.Tensor,
        **decoder_kwargs: Any,
    ) -> Any:
        """``input_ids (B, L)``, ``media (B, T_img, Q, d)``, ``media_mask (B, T_img)`` -> decoder output
        (``logits (B, L, vocab)``; the loss is the training step's, :mod:`vlmkit.core.engine.step`)."""
        embeds, _ = self._embed(decoder, input_ids, media, media_mask)
        return decoder(inputs_embeds=embeds, attention_mask=attention_mask, **decoder_kwargs)

    def generate(
        self,
        decoder: LanguageDecoder,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: torch.Tensor,
        media_mask: torch.Tensor,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """The prompt enters as embeddings (images in place); transformers' ``generate`` then feeds
        each new token through the KV cache. Returns the new tokens ``(B, new)``."""
        embeds, _ = self._embed(decoder, input_ids, media, media_mask)
        tok = decoder.tokenizer
        generate_kwargs.setdefault("pad_token_id", tok.pad_token_id)
        generate_kwargs.setdefault("eos_token_id", tok.eos_token_id)
        return decoder.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)
