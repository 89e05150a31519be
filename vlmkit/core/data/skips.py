"""Skipping bad records (``data.<alias>.on_error: skip``): reading past them and reporting them."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from multiprocessing.context import get_spawning_popen
from typing import Any, TypeVar

from vlmkit.core.data.records import printable

T = TypeVar("T")


class BadRecord(Exception):
    """A bad record met while reading a dataset: ``kind`` names the problem (each dataset lists the
    kinds it reports), ``message`` says what is wrong with the record."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def skip_summary(label: str, report: dict[str, list[str]], max_ids: int = 5) -> str:
    """``"<label>: skipped N records (kind n, ...): first ids a, b, ..."``; ``""`` when none."""
    total = sum(len(ids) for ids in report.values())
    if not total:
        return ""
    kinds = ", ".join(f"{kind} {len(ids)}" for kind, ids in report.items())
    first = [printable(str(rid)) for ids in report.values() for rid in ids][:max_ids]
    more = ", ..." if total > len(first) else ""
    noun = "record" if total == 1 else "records"
    return f"{label}: skipped {total} {noun} ({kinds}): first ids {', '.join(first)}{more}"


class SkippingReads:
    """Reading past bad records (``on_error: skip``) for datasets whose problems show only when a
    record is read (an image that does not decode).

    ``self._bad`` holds one mark per record (0 = good) in shared memory, so marks set inside
    DataLoader workers reach the parent's report; a plain pickle takes a snapshot instead."""

    _bad: Any

    def _init_marks(self, count: int) -> None:
        self._bad = multiprocessing.RawArray("b", count)

    def _first_good(
        self,
        index: int,
        build: Callable[[int], T],
        errors: tuple[type[BaseException], ...],
        mark: Callable[[int, BaseException], int],
    ) -> T | None:
        """``build(j)`` for the first record from ``index`` on (wrapping) that is not marked bad;
        a record whose ``build`` raises one of ``errors`` gets ``mark(j, error)`` (which raises
        under ``on_error: fail``) and the next one is tried. ``None`` when every record is bad."""
        n = len(self._bad)
        if not -n <= index < n:
            raise IndexError(index)
        index %= n
        for step in range(n):
            j = (index + step) % n
            if self._bad[j]:
                continue
            try:
                return build(j)
            except errors as error:
                self._bad[j] = mark(j, error)
        return None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if get_spawning_popen() is None:  # not starting a worker: a plain copy of the marks
            state["_bad"] = bytearray(bytes(self._bad))
        return state
