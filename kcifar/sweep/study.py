"""Study files: a base recipe, a grid (or a list of cells) and seeds -> the runs of a study.

A study file is TOML; recipe paths in it are relative to the study file's folder::

    description = "S0 study 1 on the CIFAR-10 stand-in"   # one line, shown in the summary
    recipe = "../recipes/s0_base.toml"                     # the base recipe (optional)
    seeds = [0, 1, 2]
    training_curves = true      # the summary's curves show training (dashed) beside validation

    [base]                      # recipe keys set on top of the base recipe (optional)
    dataset = "cifar10"

    [grid]                      # every combination of these values is a cell ...
    "model_args.blocks" = [[6, 16], [16, 32], [32, 64]]
    "train.batch_size" = [32, 64]

    [[cells]]                   # ... or an explicit list of cells (not both)
    name = "step01"             # optional: else derived from the keys / the recipe's file name
    recipe = "../recipes/s1_step01.toml"   # optional: this cell's own base recipe
    seeds = [0, 1]              # optional: this cell's seeds (a second seed where one cannot tell)
    "train.epochs" = 30

Every run of a study is an ordinary kcifar.train run named ``<cell>-s<seed>``
(recipe keys ``name`` and ``seed``), so the runs live in ``runs/<study>/``.
A cell's name joins its varied keys (last key part, or the whole dotted key
where two would clash) and values: ``blocks-16x32_batch_size-64``.
Every recipe is resolved (and so validated) when the study is loaded, before
anything runs.
"""

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from kcifar import recipe as krecipe
from kcifar.recipe import flatten, format_value, settings_name  # noqa: F401 (format_value: summary imports it from here)
from kcifar.errors import KcifarError

STUDY_KEYS = {"name", "description", "recipe", "seeds", "base", "grid", "cells", "training_curves"}
RESERVED = {"name", "seed"}  # set by the sweep for every run


@dataclass(frozen=True)
class Cell:
    name: str
    settings: dict  # dotted recipe key -> value: what this cell sets beyond the base
    recipes: tuple  # one resolved recipe per seed, in the order of ``seeds``
    seeds: tuple  # this cell's seeds: the study's, unless the cell gives its own
    recipe_file: str = ""  # the file name of the cell's base recipe ("" for none: the defaults)


@dataclass
class Study:
    name: str
    path: Path
    description: str
    seeds: list  # the seeds of every cell that does not give its own
    keys: list  # the dotted keys that vary between cells, in file order
    cells: list = field(default_factory=list)
    training_curves: bool = False  # the overlaid curves show training beside validation

    def runs(self):
        """(cell, seed, recipe) for every run, seed by seed: every cell's first seed comes before
        any cell's second, so a sweep stopped part-way already compares all its cells."""
        for seed in self.all_seeds():
            for cell in self.cells:
                if seed in cell.seeds:
                    yield cell, seed, cell.recipes[cell.seeds.index(seed)]

    def all_seeds(self) -> list:
        """The study's seeds, then any other seed a cell gives, in file order."""
        return list(dict.fromkeys([*self.seeds, *(seed for cell in self.cells for seed in cell.seeds)]))

    def seeds_text(self) -> str:
        """``seeds [0]`` plus the cells with seeds of their own: ``(s1_step05: [0, 1])``."""
        own = [f"{cell.name}: {list(cell.seeds)}" for cell in self.cells if list(cell.seeds) != self.seeds]
        return f"seeds {self.seeds}" + (f" ({'; '.join(own)})" if own else "")


def nest(flat: dict) -> dict:
    """``{"train.epochs": 3}`` -> ``{"train": {"epochs": 3}}`` (the form recipe.resolve takes)."""
    nested = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        table = nested
        for part in parents:
            table = table.setdefault(part, {})
        table[last] = value
    return nested


def load_study(path) -> Study:
    """Read, check and expand a study file; every run's recipe is resolved here."""
    path = Path(path)
    spec = krecipe.read_toml(path)
    unknown = sorted(set(spec) - STUDY_KEYS)
    if unknown:
        raise KcifarError(f"study {path}: unknown key {', '.join(unknown)}; valid keys: {', '.join(sorted(STUDY_KEYS))}")
    seeds = _checked_seeds(spec.get("seeds", [0]), path)
    name = spec.get("name", path.stem)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", ".."):
        raise KcifarError(f"study {path}: name {name!r} must be a plain folder name (letters, digits, . _ -)")
    cell_specs = _cell_specs(spec, path)
    keys = _varied_keys([settings for settings, _, _, _ in cell_specs])
    training_curves = spec.get("training_curves", False)
    if not isinstance(training_curves, bool):
        raise KcifarError(f"study {path}: training_curves must be true or false, got {training_curves!r}")
    study = Study(name, path, spec.get("description", ""), seeds, keys, training_curves=training_curves)
    base = spec.get("base", {})
    for settings, recipe_path, given_name, cell_seeds in cell_specs:
        cell = given_name or (Path(recipe_path).stem if recipe_path and not settings else settings_name(settings, keys))
        cell_seeds = tuple(cell_seeds or seeds)
        recipes = tuple(krecipe.resolve(recipe_path, [base, nest(settings), {"name": f"{cell}-s{seed}", "seed": seed}])
                        for seed in cell_seeds)
        study.cells.append(Cell(cell, settings, recipes, cell_seeds, Path(recipe_path).name if recipe_path else ""))
    names = [c.name for c in study.cells]
    if len(set(names)) != len(names):
        raise KcifarError(f"study {path}: two cells are both named {next(n for n in names if names.count(n) > 1)!r}; "
                          "give the cells distinct names")
    return study


def _checked_seeds(seeds, path: Path) -> list:
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise KcifarError(f"study {path}: seeds must be a non-empty list of distinct integers, got {seeds!r}")
    return seeds


def _cell_specs(spec: dict, path: Path) -> list:
    """[(settings, recipe path or None, given name or None, the cell's own seeds or None)] from ``[grid]``
    or ``[[cells]]``."""
    folder = path.parent
    base_recipe = _recipe_path(folder, spec["recipe"]) if "recipe" in spec else None
    if ("grid" in spec) == ("cells" in spec):
        raise KcifarError(f"study {path}: give either a [grid] table or a [[cells]] list (one of them)")
    if "grid" in spec:
        grid = flatten(spec["grid"])
        _check_settings(grid, path)
        if not grid or not all(isinstance(v, list) and v for v in grid.values()):
            raise KcifarError(f"study {path}: [grid] must map recipe keys to non-empty lists of values")
        return [(dict(zip(grid, values)), base_recipe, None, None) for values in itertools.product(*grid.values())]
    cells = spec["cells"]
    if not isinstance(cells, list) or not cells or not all(isinstance(c, dict) for c in cells):
        raise KcifarError(f"study {path}: [[cells]] must be a non-empty list of tables")
    specs = []
    for cell in cells:
        settings = flatten({k: v for k, v in cell.items() if k not in ("name", "recipe", "seeds")})
        _check_settings(settings, path)
        recipe_path = _recipe_path(folder, cell["recipe"]) if "recipe" in cell else base_recipe
        own_seeds = _checked_seeds(cell["seeds"], path) if "seeds" in cell else None
        specs.append((settings, recipe_path, cell.get("name"), own_seeds))
    return specs


def _varied_keys(all_settings: list) -> list:
    """The keys whose value differs between cells (all keys when there is one cell), in file order."""
    keys = list(dict.fromkeys(k for settings in all_settings for k in settings))
    varied = [k for k in keys if len({repr(s.get(k)) for s in all_settings}) > 1]
    return varied if len(all_settings) > 1 else keys


def _check_settings(settings: dict, path: Path):
    reserved = sorted(RESERVED & set(settings))
    if reserved:
        raise KcifarError(f"study {path}: the sweep sets {', '.join(reserved)} itself; use seeds = [...] "
                          "and cell names instead")


def _recipe_path(folder: Path, relative) -> Path:
    recipe_path = folder / relative
    if not recipe_path.is_file():
        raise KcifarError(f"base recipe {recipe_path} not found (recipe paths are relative to the study file)")
    return recipe_path
