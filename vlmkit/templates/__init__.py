"""The built-in chat templates, registered from ``vlmkit/registry.yaml``; :mod:`.base` holds the
helpers they share (record checks, segment building)."""
