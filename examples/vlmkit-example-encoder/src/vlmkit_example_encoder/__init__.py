"""vlmkit-example-encoder: a template plug-in for vlmkit.

It registers one vision encoder, ``patch_embed`` (:class:`~vlmkit_example_encoder.encoder.PatchEmbedEncoder`),
through the entry-point group ``vlmkit``. Importing this package is cheap: torch is imported only
when the encoder is used.
"""

__version__ = "0.1.0"
