"""The one-line report of skipped bad records (``data.<alias>.on_error: skip``)."""

from __future__ import annotations


def skip_summary(label: str, report: dict[str, list[str]], max_ids: int = 5) -> str:
    """``"<label>: skipped N records (kind n, ...): first ids a, b, ..."``; ``""`` when none."""
    total = sum(len(ids) for ids in report.values())
    if not total:
        return ""
    kinds = ", ".join(f"{kind} {len(ids)}" for kind, ids in report.items())
    first = [rid for ids in report.values() for rid in ids][:max_ids]
    more = ", ..." if total > len(first) else ""
    noun = "record" if total == 1 else "records"
    return f"{label}: skipped {total} {noun} ({kinds}): first ids {', '.join(first)}{more}"
