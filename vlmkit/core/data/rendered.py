"""A dataset seen through its chat template: index -> :class:`~vlmkit.core.interfaces.Sample`."""

from __future__ import annotations

from typing import Any

from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import Dataset, Sample


class RenderedDataset:
    """``dataset[i]`` rendered by ``template`` (records) or passed through (ready-made samples)."""

    def __init__(self, dataset: Any, template: Any, tokenizer: Any, alias: str):
        self.dataset = dataset
        self.template = template
        self.tokenizer = tokenizer
        self.alias = alias

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        item = self.dataset[index]
        if isinstance(item, Sample):
            return item
        if self.template is None:
            raise VlmkitError(
                f"data.{self.alias}.template: dataset '{self.alias}' yields conversations; name the chat template "
                "that renders them (e.g. otter, vicuna_v1, llava_plain, chat_template)"
            )
        return self.template.render(item, self.tokenizer)

    def summary(self) -> str:
        """The wrapped dataset's bad-record summary (:meth:`vlmkit.core.interfaces.Dataset.summary`;
        ``""`` when nothing was skipped, or when it wraps a plain sequence rather than a dataset)."""
        return self.dataset.summary() if isinstance(self.dataset, Dataset) else ""
