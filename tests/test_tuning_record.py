"""A stage's tuning is one object whose apply() returns exactly what it made trainable."""

from __future__ import annotations

import json

import torch

from tiny import resolved_toy
from vlmkit.core.compose import build_model
from vlmkit.core.recipe.schema import StageTune
from vlmkit.core.tuning import StageTuning, TuningRecord, adapter_layers, records_json


def _tune(**modes):
    base = {"encoder": "frozen", "connector": "frozen", "fusion": "frozen", "decoder": "frozen"}
    return StageTune.model_validate(base | modes)


def test_the_record_names_exactly_the_trainable_parameters_and_the_lora_modules(tmp_path):
    model = build_model(resolved_toy(tmp_path))
    first = StageTuning(_tune(connector="full"), "stages.0.tune").apply(model)
    assert first.names == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all(n.startswith("connector.") for n in first.names) and first.lora == {}
    assert first.stage == "stages.0" and first.report["connector"]["frozen"] == 0

    tune = _tune(decoder={"mode": "lora", "lora": {"r": 4, "alpha": 8.0}})
    second = StageTuning(tune, "stages.1.tune").apply(model, previous=first)
    wrapped = sorted(adapter_layers(model.decoder))
    assert wrapped and second.lora["decoder"]["target_modules"] == wrapped
    assert (second.lora["decoder"]["r"], second.lora["decoder"]["alpha"]) == (4, 8.0)
    assert second.names == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert second.names and all(n.startswith("decoder.") and ".lora_" in n for n in second.names)
    # a later stage reuses the adapters (no second injection) and records the same config
    third = StageTuning(tune, "stages.2.tune").apply(model, previous=second)
    assert sorted(adapter_layers(model.decoder)) == wrapped and third.lora == second.lora
    # the JSON of the records reads back to the same records
    back = [TuningRecord.from_json(r) for r in json.loads(records_json([first, second, third]))]
    assert back == [first, second, third]


def test_gradient_masks_live_in_the_record_and_the_next_stage_removes_them(tmp_path):
    model = build_model(resolved_toy(tmp_path))
    masked = StageTuning(_tune(embeddings="new_tokens"), "stages.0.tune", new_token_rows=False).apply(model)
    ids = sorted(set(model.decoder.new_token_ids))
    assert masked.embedding_rows == ids and len(masked.gradient_masks) >= 1
    assert not hasattr(model.decoder, "_vlmkit_embedding_hooks")  # nothing planted on the module
    table = model.decoder.get_input_embeddings().weight
    table.sum().backward()
    assert torch.count_nonzero(table.grad.abs().sum(-1)) == len(ids)  # only the added rows get gradient
    table.grad = None
    StageTuning(_tune(embeddings="all"), "stages.1.tune").apply(model, previous=masked)
    assert masked.gradient_masks == []
    model.decoder.get_input_embeddings().weight.sum().backward()
    assert bool((model.decoder.get_input_embeddings().weight.grad == 1).all())  # no mask left
