"""The README's recipe example is a valid recipe and trains (smoke profile)."""

from __future__ import annotations

import re
from pathlib import Path

from vlmkit.core.recipe.loader import validate_all_profiles

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_recipe_example_validates(tmp_path):
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## A recipe") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    path = tmp_path / "readme_recipe.yaml"
    path.write_text(block, encoding="utf-8")
    _, checked = validate_all_profiles(path)
    assert checked == ["(no profile)", "smoke"]
