"""What one server accepts: the limits on images, text and waiting requests."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, PositiveInt


class Limits(BaseModel):
    """Limits of one server (``recipes serve`` options of the same names)."""

    model_config = ConfigDict(extra="forbid")

    max_images: PositiveInt = 8
    """Images per request, in-context examples' images included."""
    max_image_bytes: PositiveInt = 10 * 2**20
    """Size of one encoded image (after base64 decoding)."""
    max_image_pixels: PositiveInt = 4096 * 4096
    """Width x height of one image, checked from its header before it is decoded (the guard against
    decompression bombs: a few kilobytes that decode to gigabytes)."""
    max_text_chars: PositiveInt = 4000
    """Characters of text per request, all messages together."""
    max_new_tokens: PositiveInt = 256
    """The most new tokens a request may ask for."""
    max_beams: PositiveInt = 4
    """The most beams a request may ask for."""
    max_queue: int = 8
    """Requests that may wait while one is answered; one more gets a "busy" answer (HTTP 503)."""
    require_image: bool = True
    """A question must come with at least one image (the served models are vision-language models)."""
