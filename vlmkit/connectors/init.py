"""BERT-style initialisation shared by the query-based connectors (Q-Former, abstractor)."""

from __future__ import annotations

from torch import nn


def init_bert_style(module: nn.Module, std: float) -> None:
    """Every Linear: weight normal(0, std), bias zero; every LayerNorm: weight one, bias zero."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
