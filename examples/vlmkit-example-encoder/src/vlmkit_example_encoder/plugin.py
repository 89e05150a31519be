"""The plug-in module named by the entry point ``[project.entry-points.vlmkit]``.

vlmkit imports this module when it builds its registry and calls each hook it implements with a
``register(name, component, summary=None)`` callback. Registering by ``"module:object"`` string
keeps ``recipes plugins`` / ``recipes components`` fast: the encoder module (and torch) is only
imported when a recipe uses ``patch_embed``. Registering the class itself works too::

    from vlmkit_example_encoder.encoder import PatchEmbedEncoder
    register("patch_embed", PatchEmbedEncoder)   # checked against the interface right away
"""

from __future__ import annotations

from vlmkit import hookimpl


@hookimpl
def register_encoders(register):
    register(
        "patch_embed",
        "vlmkit_example_encoder.encoder:PatchEmbedEncoder",
        summary="A learnable patch embedding (Conv2d, kernel = stride = patch_size) with LayerNorm.",
    )
