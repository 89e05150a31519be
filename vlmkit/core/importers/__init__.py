"""Importers of other frameworks' checkpoints into composed vlmkit models."""
