"""`--set KEY=VALUE`: change any recipe key from the command line, before validation.

Keys are dotted paths into the recipe (`gradient_clipping.max_norm`, `datasets.0.path`: a number indexes a
list, the list's length appends); values are YAML (`1e-4` is a float, `true` a bool, `[q_proj, v_proj]` a
list, `null` removes a setting). The overrides are applied to the recipe's YAML data, so the result is
validated exactly like a file that said the same; a problem in an overridden key names the `--set` it came
from. The recipe saved with the run lists the overrides (see `recipe.dump_recipe`)."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import yaml

from ftclip.errors import Problem, RecipeError
from ftclip.recipe import Recipe, _clipping_from_shorthand


@dataclass(frozen=True)
class Override:
    text: str  # KEY=VALUE as typed, for messages and the saved recipe
    key: str  # dotted
    value: Any

    @property
    def parts(self) -> list[str]:
        return self.key.split(".")


def parse_override(text: str, file: str = "--set") -> Override:
    key, equals, raw = text.partition("=")
    key = key.strip()
    if not equals or not key:
        raise RecipeError([Problem(file, "", f"--set {text}: expected KEY=VALUE, e.g. --set learning_rate=1e-4")])
    if any(not part for part in key.split(".")):
        raise RecipeError([Problem(file, key, f"--set {text}: empty part in the dotted key")])
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        reason = getattr(error, "problem", None) or str(error)
        raise RecipeError([Problem(file, key, f"--set {text}: the value is not valid YAML ({reason}); "
                                              "quote it in the shell, e.g. --set 'KEY=\"a: b\"'")]) from None
    return Override(text, key, value)


def _fail(file: str, override: Override, message: str) -> RecipeError:
    return RecipeError([Problem(file, override.key, f"--set {override.text}: {message}")])


def _assign(node: Any, parts: list[str], value: Any, override: Override, file: str, done: list[str]) -> None:
    """Set node[parts...] = value, creating mappings/lists on the way where the key is absent."""
    part, rest = parts[0], parts[1:]
    where = ".".join(done) or "the recipe"
    if isinstance(node, list):
        if not part.isdigit():
            raise _fail(file, override, f"{where} is a list; index it with a number (0 to {len(node) - 1})")
        index = int(part)
        if index > len(node):
            raise _fail(file, override, f"{where} has indices 0 to {len(node) - 1}; index {len(node)} adds an entry")
        if index == len(node):
            node.append(None)
        key: int | str = index
    elif isinstance(node, dict):
        key = part
    else:
        raise _fail(file, override, f"{where} is {node!r}, not a mapping or a list")
    if not rest:
        node[key] = value
        return
    child = node[key] if isinstance(node, list) else node.get(key)
    if child is None:
        node[key] = [] if rest[0].isdigit() else {}
    _assign(node[key], rest, value, override, file, done + [part])


def apply_overrides(data: dict[str, Any], overrides: list[Override], file: str = "<recipe>") -> dict[str, Any]:
    """A copy of the recipe data with the overrides applied in order (a later one wins). Raises one
    RecipeError listing every override that cannot be applied."""
    data = copy.deepcopy(data)
    problems: list[Problem] = []
    for override in overrides:
        if override.parts[0] == "max_grad_norm":  # Hugging Face's name for the same setting
            override = Override(override.text, "gradient_clipping" + override.key[len("max_grad_norm"):], override.value)
        if override.parts[0] == "gradient_clipping":
            # The command line wins over the file's spelling (no "both given" error), and
            # `gradient_clipping.max_norm=…` works whether the file used the number shorthand or not.
            if "max_grad_norm" in data:
                data.setdefault("gradient_clipping", data.pop("max_grad_norm"))
            if len(override.parts) > 1:
                current = data.get("gradient_clipping")
                data["gradient_clipping"] = _clipping_from_shorthand(current) if current is not None else {}
        try:
            _assign(data, override.parts, override.value, override, file, [])
        except RecipeError as error:
            problems += error.problems
    if problems:
        raise RecipeError(problems)
    return data


def _source(key: str, overrides: list[Override]) -> Override | None:
    """The last override that set this key, a key inside it, or a key it lies in."""
    normalized = "gradient_clipping" + key[len("max_grad_norm"):] if key.startswith("max_grad_norm") else key
    for override in reversed(overrides):
        mine = "gradient_clipping" + override.key[len("max_grad_norm"):] if override.key.startswith("max_grad_norm") \
            else override.key
        if normalized == mine or normalized.startswith(mine + ".") or mine.startswith(normalized + "."):
            return override
    return None


def blame(problems: list[Problem], overrides: list[Override]) -> list[Problem]:
    """Problems in overridden keys name the `--set` they came from (and no line of the file); a problem
    elsewhere whose message names an overridden key (`warmup_steps: 10 >= max_steps 3`) names it too."""
    blamed = []
    for problem in problems:
        source = _source(problem.key, overrides) if problem.key else None
        if source is not None:
            blamed.append(Problem(problem.file, problem.key, f"{problem.message} (from --set {source.text})"))
            continue
        named = [o for o in overrides if re.search(rf"\b{re.escape(o.parts[0])}\b", problem.message)]
        if named:
            problem = Problem(problem.file, problem.key, f"{problem.message} (with --set {named[-1].text})", problem.line)
        blamed.append(problem)
    return blamed


def recipe_overrides(recipe: Recipe) -> list[Override]:
    return list(recipe._overrides)
