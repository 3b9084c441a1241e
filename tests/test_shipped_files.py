"""Every recipe and study file shipped in experiments/ loads as its command would load it."""

import re
from pathlib import Path

import pytest

from kcifar import finetune
from kcifar import recipe as krecipe
from kcifar.models import registry
from kcifar.sweep.study import load_study

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
RECIPES = sorted((EXPERIMENTS / "recipes").glob("*.toml"))
STUDIES = sorted((EXPERIMENTS / "sweeps").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_resolves_to_a_zoo_model(path):
    if path.stem.startswith("finetune_"):
        recipe = finetune.resolve_recipe(path)
        assert recipe["dataset"] in ("cifar10", "cifar100")
    else:
        recipe = krecipe.resolve(path)
        assert recipe["model"] in registry.names()


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_every_shipped_study_expands_into_runs_of_zoo_models(path):
    study = load_study(path)
    runs = list(study.runs())
    assert len(runs) == sum(len(cell.seeds) for cell in study.cells) > 0
    assert len({recipe["name"] for _, _, recipe in runs}) == len(runs)  # one run directory each
    assert all(recipe["model"] in registry.names() for _, _, recipe in runs)


def test_every_relative_link_of_the_readmes_and_docs_resolves():
    root = Path(__file__).resolve().parents[1]
    pages = [root / "README.md", root / "experiments" / "README.md", *sorted((root / "docs").glob("*.md"))]
    broken = [(page.relative_to(root), link) for page in pages
              for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8"))
              if not link.startswith(("http://", "https://")) and not (page.parent / link).exists()]
    assert broken == []
