"""The built-in dataset types (one module per family), registered from ``vlmkit/registry.yaml``."""
