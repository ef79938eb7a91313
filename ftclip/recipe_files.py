"""Reading a recipe file, as every command does: ftclip's own recipe, or an Axolotl config read through the
importer in memory (`ftclip train their-axolotl.yml` works as it is; `ftclip import-axolotl` stays for committing
the converted recipe). The `--set KEY=VALUE` overrides apply to the file's own keys first, so they are spelled as
the file spells them.

How a file is told apart: it is an Axolotl config when it has a key (top level, or in a dataset entry) that is
not ftclip's but is in the importer's table of Axolotl keys, or a dataset `type` only Axolotl has. A key that is
neither ftclip's nor Axolotl's is an error either way, with ftclip's "did you mean" (a typo stays a typo).
A file with ftclip-only keys (gradient_clipping, device, ...) is an ftclip recipe carrying a few Axolotl keys:
those are converted, and ftclip's defaults stay (Axolotl's defaults are written only for a whole Axolotl config).

Import direction: this module → ftclip.axolotl (the importer) → ftclip.recipe. The recipe knows nothing of
Axolotl."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from ftclip.errors import Problem, RecipeError
from ftclip.overrides import Override, apply_overrides, blame, parse_override
from ftclip.recipe import DATASET_TYPES, PREFERENCE_TYPES, DatasetSpec, Recipe, _key_lines, _line_of, allowed_keys, parse_recipe


def read_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """The recipe a file means, with the `--set` overrides applied before validation. For an Axolotl config,
    `recipe._imported` holds the importer's report (mapped, dropped) for the command to print."""
    file = str(path)
    parsed = _parse_overrides(overrides or [], file)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([Problem(file, "", "no such recipe file")]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError([Problem(file, "", f"cannot read the recipe: {error}")]) from None
    folder = Path(path).parent
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return _native(text, file, folder, parsed)  # parse_recipe words the YAML error with its line
    if not isinstance(data, dict):
        return _native(text, file, folder, parsed)
    lines, duplicates = _key_lines(node)
    duplicated = [Problem(file, ".".join(map(str, key)), "key given twice; YAML would silently keep the last", line)
                  for key, line in duplicates]
    changed = apply_overrides(data, parsed, file)
    foreign = axolotl_keys(changed)
    if not foreign:
        recipe = _native(yaml.safe_dump(changed, sort_keys=False) if parsed else text, file, folder, parsed, lines)
        if duplicated:
            raise RecipeError(duplicated)
        return recipe
    typos = [Problem(file, key, message, _line(key, lines)) for key, message in unknown_keys(changed)]
    if typos or duplicated:
        raise RecipeError(blame(duplicated + typos, parsed))
    return _imported(changed, file, folder, parsed, lines)


def _parse_overrides(texts: list[str], file: str) -> list[Override]:
    overrides, problems = [], []
    for text in texts:  # every malformed one reported at once
        try:
            overrides.append(parse_override(text, file))
        except RecipeError as error:
            problems += error.problems
    if problems:
        raise RecipeError(problems)
    return overrides


def _line(key: str, lines: dict) -> int | None:
    loc = tuple(int(part) if part.isdigit() else part for part in key.split(".")) if key else ()
    return _line_of(loc, lines) if loc else None


def _native(text: str, file: str, folder: Path, overrides: list[Override], lines: dict | None = None) -> Recipe:
    try:
        recipe = parse_recipe(text, file, folder)
    except RecipeError as error:
        if not overrides:
            raise
        problems = []
        for problem in blame(error.problems, overrides):
            if "(from --set " not in problem.message and lines is not None:  # a line of the real file
                problem = Problem(file, problem.key, problem.message, _line(problem.key, lines))
            problems.append(problem)
        raise RecipeError(problems) from None
    recipe._overrides = overrides
    return recipe


# ---------------------------------------------------------------- Axolotl configs


def axolotl_keys(data: dict[str, Any]) -> list[str]:
    """The keys (dotted, e.g. datasets.0.type) that make this an Axolotl config; empty for an ftclip recipe."""
    from ftclip.axolotl.table import AXOLOTL_KEYS, DATASET_KEYS, TRACKER_PREFIXES, is_axolotl_dataset_type

    ours = set(allowed_keys(Recipe))
    found = [key for key in data
             if key not in ours and (key in AXOLOTL_KEYS or str(key).startswith(TRACKER_PREFIXES))]
    dataset_keys = set(DatasetSpec.model_fields)
    native_types = {*DATASET_TYPES, "chat_template", *PREFERENCE_TYPES}
    for group, index, entry in _dataset_entries(data):
        found += [f"{group}.{index}.{key}" for key in entry if key not in dataset_keys and key in DATASET_KEYS]
        kind = entry.get("type")
        native = isinstance(kind, dict) or (isinstance(kind, str) and kind in native_types)  # a mapping: a prompt format
        if not native and is_axolotl_dataset_type(kind):  # else a typo, for the native error
            found.append(f"{group}.{index}.type")  # an Axolotl-only type
    return found


def _dataset_entries(data: dict[str, Any]) -> list[tuple[str, int, dict]]:
    """(datasets or test_datasets, index, entry) for each dataset entry that is a mapping."""
    found = []
    for group in ("datasets", "test_datasets"):
        value = data.get(group)
        entries = [value] if isinstance(value, dict) else value if isinstance(value, list) else []
        found += [(group, index, entry) for index, entry in enumerate(entries) if isinstance(entry, dict)]
    return found


def unknown_keys(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, message) for keys neither ftclip nor Axolotl has, with ftclip's "did you mean"."""
    from ftclip.axolotl.table import AXOLOTL_KEYS, DATASET_KEYS, TRACKER_PREFIXES

    unknown = []
    ours = allowed_keys(Recipe)
    for key in data:
        if key not in ours and key not in AXOLOTL_KEYS and not str(key).startswith(TRACKER_PREFIXES):
            unknown.append((str(key), _unknown(str(key), ours + list(AXOLOTL_KEYS))))
    known = list(DatasetSpec.model_fields) + list(DATASET_KEYS)
    for group, index, entry in _dataset_entries(data):
        unknown += [(f"{group}.{index}.{key}", _unknown(str(key), known)) for key in entry if key not in known]
    return unknown


def _unknown(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key: neither an ftclip key nor an Axolotl key{hint}"


def _imported(data: dict, file: str, folder: Path, overrides: list[Override], lines: dict) -> Recipe:
    from ftclip.axolotl.importer import import_mapping
    from ftclip.axolotl.table import FTCLIP_ONLY_KEYS

    # An ftclip recipe with a few Axolotl keys keeps ftclip's defaults; a whole Axolotl config gets Axolotl's.
    own_defaults = bool(set(data) & FTCLIP_ONLY_KEYS)
    result = import_mapping(data, file, axolotl_defaults=not own_defaults)
    if result.refused or result.problems or result.recipe is None:
        problems = [Problem(file, _dotted(key), f"Axolotl key `{key}`: not supported: {why}", _line(_dotted(key), lines))
                    for key, why in result.refused]
        problems += [_problem_from_text(text, file, lines) for text in result.problems]
        raise RecipeError(blame(problems or [Problem(file, "", "the Axolotl config could not be converted")], overrides))
    recipe = parse_recipe(yaml.safe_dump(result.recipe, sort_keys=False, allow_unicode=True), file, folder)
    recipe._overrides = overrides
    recipe._imported = result
    return recipe


def _dotted(key: str) -> str:
    """The importer's datasets[0].type as a dotted key (datasets.0.type), for line numbers."""
    return key.replace("[", ".").replace("]", "")


def _problem_from_text(text: str, file: str, lines: dict) -> Problem:
    key, colon, message = text.partition(": ")
    if colon and " " not in key:
        return Problem(file, key, message, _line(key, lines))
    return Problem(file, "", text)
