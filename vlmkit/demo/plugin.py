"""The demo package's plug-in: the ``${demo_data}`` recipe placeholder (the generated MIMIC-IT-shaped
demo data in the user's cache, written on first use). Registered by reference, so loading the
registry does not import the generator."""

from __future__ import annotations

from vlmkit import hookimpl


@hookimpl
def register_recipe_placeholders(register):
    register(
        "demo_data",
        "vlmkit.demo.data:demo_data_dir",
        summary="the demo MIMIC-IT data in the user's cache, written on first use",
    )
