"""vlmkit-example-connector: a template third-party connector plug-in for vlmkit.

It registers one connector, ``pooled_tokens``
(:class:`~vlmkit_example_connector.connector.PooledTokens`), through the entry-point group
``vlmkit``. Importing this package is cheap: torch is imported only when the connector is used.
"""

__version__ = "0.1.0"
