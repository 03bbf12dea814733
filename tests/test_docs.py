"""The README's claims agree with the files they describe."""

import re
from pathlib import Path

import pytest

from mnist_lit.flags import CONFIGS

README = Path(__file__).resolve().parents[1] / "README.md"
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def recipes_table() -> dict[str, list[str]]:
    """The README's recipes table: recipe name -> its row's cells."""
    rows = {}
    for line in README.read_text().splitlines():
        found = re.match(r"\| `(\w+)`", line)
        if found and line.count("|") >= 6:
            rows[found[1]] = [cell.strip() for cell in line.strip("|").split("|")]
    return rows


def yaml_header(recipe: str) -> str:
    """The comment lines at the top of a recipe's YAML file."""
    lines = (CONFIGS / f"{recipe}.yaml").read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("#"))])


def test_readme_has_a_recipes_table():
    assert "seed" in recipes_table()


@pytest.mark.parametrize("recipe", recipes_table())
def test_readme_figures_of_a_recipe_are_the_ones_its_yaml_quotes(recipe):
    *_, file, accuracy, time = recipes_table()[recipe]
    assert file == f"`configs/{recipe}.yaml`"
    quoted = set(NUMBER.findall(yaml_header(recipe)))
    for cell in (accuracy, time):
        missing = [n for n in NUMBER.findall(cell) if n not in quoted]
        assert not missing, f"README's {recipe} row says {cell!r}; configs/{recipe}.yaml's header lacks {missing}"


def test_readme_stays_short():
    assert len(README.read_bytes()) <= 12 * 1024
