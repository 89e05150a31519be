"""Errors that are the user's to fix. The CLI prints their message (no traceback) and exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VlmkitError(Exception):
    """A mistake in a recipe, a command line, a plug-in or the data: the message says what to change."""

    exit_code = 2


class RecipeError(VlmkitError):
    """A recipe that does not load or validate. ``problems`` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        if len(problems) == 1:
            text = f"{source}: {problems[0]}"
        else:
            text = f"{source}: {len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems)
        super().__init__(text)


class PluginError(VlmkitError):
    """A plug-in that could not be loaded or registered (fatal in strict mode), or a name clash."""


class DuplicateComponentError(PluginError):
    """Two providers registered the same name for the same kind."""


def suggest(word: str, choices: Iterable[str]) -> str:
    """'; did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def listing(choices: Iterable[str]) -> str:
    items = sorted(choices)
    return ", ".join(items) if items else "(none registered)"
