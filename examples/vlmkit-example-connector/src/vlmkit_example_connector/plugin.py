"""The plug-in module named by the entry point ``[project.entry-points.vlmkit]``.

vlmkit imports this module when it builds its registry and calls each hook it implements with a
``register(name, component, summary=None)`` callback. The connector is registered by
``"module:object"`` string, so ``recipes plugins`` stays fast: torch and the connector module are
imported only when a recipe uses ``pooled_tokens``.
"""

from __future__ import annotations

from vlmkit import hookimpl


@hookimpl
def register_connectors(register):
    register(
        "pooled_tokens",
        "vlmkit_example_connector.connector:PooledTokens",
        summary="Adaptive average pooling of the encoder's tokens to num_queries, then an MLP to the decoder width.",
    )
