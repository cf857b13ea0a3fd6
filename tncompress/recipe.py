"""Recipe (v1): YAML schema, validation, and rule matching of layers.

Tiers, lowest to highest precedence: ``defaults`` (per type) < ``type`` rules < ``pattern`` /
``regex`` rules < ``name`` rules; inside a tier, a later rule wins. Settings cascade: a layer's
settings are the defaults for its type overlaid by every matching rule in that order, so a rule may
change only the rank; a rule that switches to another method starts afresh (the lower tiers'
settings were meant for the other method). ``exclude`` beats everything. A rule (or exclude entry) that matches no layer
is an error with the closest layer names as hints; unknown keys are errors.
"""
from __future__ import annotations

import copy
import difflib
import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tncompress import methods as method_registry
from tncompress.errors import RecipeError

RECIPE_VERSION = 1
TYPES = ("Linear", "Conv2d", "Embedding")
SELECTORS = ("name", "pattern", "regex", "type")
# settings every method accepts: a bound on the layer's relative output error on the calibration batch
COMMON_SETTING_KEYS = frozenset({"max_output_error", "data_aware", "allow_growth"})
BOOLEAN_KEYS = frozenset({"data_aware", "allow_growth"})
TOP_KEYS = frozenset({"version", "defaults", "layers", "exclude", "calibration", "budget"})
BUDGET_KEYS = frozenset({"params_ratio", "macs_ratio", "sensitivity", "candidates", "cp_iterations", "scan_samples"})
CALIBRATION_KEYS = frozenset({"batch_size", "seed", "max_output_error", "max_model_error", "reestimate_bn"})
ERROR_BOUND_KEYS = frozenset({"max_output_error", "max_model_error"})
TIER_RANK = {"defaults": 0, "type": 1, "pattern": 2, "regex": 2, "name": 3}


@dataclass
class Rule:
    """One entry of ``layers``: a selector plus settings."""

    index: int
    selector: str            # "name", "pattern", "regex" or "type"
    value: str
    type_filter: str | None  # optional ``type`` next to a name/pattern/regex selector
    settings: dict[str, Any]
    _regex: re.Pattern[str] | None = None

    @property
    def label(self) -> str:
        extra = f", type: {self.type_filter}" if self.type_filter else ""
        return f"layers[{self.index}] ({self.selector}: {self.value}{extra})"

    def matches(self, name: str, type_name: str) -> bool:
        if self.type_filter and self.type_filter != type_name:
            return False
        if self.selector == "name":
            return name == self.value
        if self.selector == "pattern":
            return fnmatch.fnmatchcase(name, self.value)
        if self.selector == "regex":
            assert self._regex is not None
            return self._regex.fullmatch(name) is not None
        return self.value == type_name


@dataclass
class Recipe:
    """A validated recipe."""

    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] | None = None   # global rank budget (see tncompress.budget)
    source: str = "<recipe>"
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerChoice:
    """What the recipe says about one layer: merged settings and the rules behind them."""

    name: str
    type_name: str
    settings: dict[str, Any]
    rules: list[str]          # labels of every contributing rule, lowest precedence first
    decided_by: str | None    # the highest-precedence rule that matched, None when none did
    excluded_by: str | None = None


def _where(source: str, key: str) -> str:
    """``source: key``; a key with control characters or only blanks is quoted, so the line stays one line."""
    shown = key if key.isprintable() and key.strip() else repr(key)
    return f"{source}: {shown}"


def method_keys() -> dict[str, frozenset[str]]:
    """The settings keys each registered method takes (besides ``method``); ``none`` takes none."""
    keys = {name: m.settings.keys() for name, m in method_registry.all_methods().items()}
    return {**keys, "none": frozenset()}


def all_setting_keys() -> frozenset[str]:
    return frozenset({"method"}).union(*method_keys().values(), COMMON_SETTING_KEYS)


def _check_method(source: str, key: str, method: Any) -> str:
    if not isinstance(method, str):
        raise RecipeError(f"{_where(source, key)}: method must be a string, got {method!r}")
    method = method_registry.resolve_name(method)
    known = list(method_keys())
    if method not in known:
        hint = difflib.get_close_matches(method, known, n=1)
        raise RecipeError(f"{_where(source, key)}: unknown method {method!r}"
                          f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; known: {', '.join(known)}")
    return method


def _check_value(source: str, key: str, method: str | None, setting: str, value: Any) -> None:
    """Check a method setting's value where the recipe gives it (``n_iter: ten`` is one line here):
    against the rule's own method, or, in a rule that only changes settings, against every method
    that takes the key (it must suit one of them; the planner checks the merged result again)."""
    owners = ([method_registry.get_method(method)] if method not in (None, "none")
              else [m for m in method_registry.all_methods().values() if setting in m.settings.keys()])
    owners = [m for m in owners if setting in m.settings.keys()]
    problems = []
    for m in owners:
        try:
            m.settings.check_value(setting, value, _where(source, key))
            return
        except RecipeError as exc:
            problems.append(exc)
    if problems:
        raise problems[0]


def _check_settings(source: str, key: str, settings: Any, allowed_extra: Sequence[str] = ()) -> dict[str, Any]:
    if not isinstance(settings, dict):
        raise RecipeError(f"{_where(source, key)}: expected a mapping of settings, got {type(settings).__name__}")
    out: dict[str, Any] = {}
    known = all_setting_keys()
    for k, v in settings.items():
        if not isinstance(k, str):
            raise RecipeError(f"{_where(source, key)}: setting names must be strings, got {k!r}")
        if k in allowed_extra:
            continue
        if k not in known:
            hint = difflib.get_close_matches(k, sorted(known | set(allowed_extra)), n=1)
            raise RecipeError(f"{_where(source, key)}: unknown key {k!r}"
                              f"{f' (did you mean {hint[0]!r}?)' if hint else ''}")
        if k in ERROR_BOUND_KEYS:
            _check_bound(source, f"{key}.{k}", v)
        if k in BOOLEAN_KEYS and not isinstance(v, bool):
            raise RecipeError(f"{_where(source, f'{key}.{k}')}: expected true or false, got {v!r}")
        out[k] = _check_method(source, f"{key}.method", v) if k == "method" else v
    method = out.get("method")
    for k, v in out.items():
        if k != "method" and k not in ERROR_BOUND_KEYS and k not in BOOLEAN_KEYS:
            _check_value(source, key, method, k, v)
    return out


def _check_bound(source: str, key: str, value: Any) -> float:
    """An error bound: a positive, finite number (relative error, e.g. 0.3)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise RecipeError(f"{_where(source, key)}: expected a positive number (a relative error such as 0.3), got {value!r}")
    return float(value)


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate a recipe given as parsed YAML (a dict) and return a :class:`Recipe`."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with 'version: 1', got {type(data).__name__}")
    unknown = set(map(str, data)) - TOP_KEYS
    if unknown:
        k = sorted(unknown)[0]
        hint = difflib.get_close_matches(k, sorted(TOP_KEYS), n=1)
        raise RecipeError(f"{_where(source, k)}: unknown top-level key{f' (did you mean {hint[0]!r}?)' if hint else ''}"
                          f"; allowed: {', '.join(sorted(TOP_KEYS))}")
    if "version" not in data:
        raise RecipeError(f"{source}: missing 'version: 1'")
    if data["version"] != RECIPE_VERSION or isinstance(data["version"], bool):
        raise RecipeError(f"{_where(source, 'version')}: unsupported recipe version {data['version']!r}; "
                          "this tncompress reads version 1")

    recipe = Recipe(source=source, raw=copy.deepcopy(data))
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise RecipeError(f"{_where(source, 'defaults')}: expected a mapping of type → settings, "
                          "e.g. 'Linear: {method: tt, rank: 8}'")
    for type_name, settings in defaults.items():
        if type_name not in TYPES:
            hint = difflib.get_close_matches(str(type_name), TYPES, n=1)
            raise RecipeError(f"{_where(source, f'defaults.{type_name}')}: unknown layer type"
                              f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; supported: {', '.join(TYPES)}")
        recipe.defaults[type_name] = _check_settings(source, f"defaults.{type_name}", settings)

    layers = data.get("layers") or []
    if not isinstance(layers, list):
        raise RecipeError(f"{_where(source, 'layers')}: expected a list of rules")
    for i, entry in enumerate(layers):
        key = f"layers[{i}]"
        if not isinstance(entry, dict):
            raise RecipeError(f"{_where(source, key)}: each rule is a mapping like '{{name: fc1, method: tt, rank: 4}}'")
        picked = [s for s in ("name", "pattern", "regex") if s in entry]
        if len(picked) > 1:
            raise RecipeError(f"{_where(source, key)}: give one of name / pattern / regex, not {' and '.join(picked)}")
        if not picked and "type" not in entry:
            raise RecipeError(f"{_where(source, key)}: a rule needs a selector: name, pattern, regex or type")
        selector = picked[0] if picked else "type"
        value = entry[selector]
        if not isinstance(value, str) or not value:
            raise RecipeError(f"{_where(source, f'{key}.{selector}')}: expected a non-empty string, got {value!r}")
        type_filter = entry.get("type") if picked else None
        for t in [entry.get("type")] if "type" in entry else []:
            if t not in TYPES:
                raise RecipeError(f"{_where(source, f'{key}.type')}: unknown layer type {t!r}; supported: {', '.join(TYPES)}")
        settings = _check_settings(source, key, entry, allowed_extra=SELECTORS)
        rule = Rule(i, selector, value, type_filter, settings)
        if selector == "regex":
            try:
                rule._regex = re.compile(value)
            except re.error as exc:
                raise RecipeError(f"{_where(source, f'{key}.regex')}: invalid regular expression {value!r} ({exc})") from None
        recipe.rules.append(rule)

    exclude = data.get("exclude") or []
    if isinstance(exclude, str):
        exclude = [exclude]
    if not isinstance(exclude, list) or not all(isinstance(e, str) and e for e in exclude):
        raise RecipeError(f"{_where(source, 'exclude')}: expected a list of layer names or glob patterns")
    recipe.exclude = list(exclude)

    calibration = data.get("calibration") or {}
    if not isinstance(calibration, dict):
        raise RecipeError(f"{_where(source, 'calibration')}: expected a mapping ({', '.join(sorted(CALIBRATION_KEYS))})")
    for k, v in calibration.items():
        if k not in CALIBRATION_KEYS:
            raise RecipeError(f"{_where(source, f'calibration.{k}')}: unknown key; "
                              f"allowed: {', '.join(sorted(CALIBRATION_KEYS))}")
        if k in ERROR_BOUND_KEYS:
            _check_bound(source, f"calibration.{k}", v)
        elif k == "reestimate_bn":
            if not isinstance(v, bool):
                raise RecipeError(f"{_where(source, 'calibration.reestimate_bn')}: expected true or false, got {v!r}")
        elif not isinstance(v, int) or isinstance(v, bool) or v < (1 if k == "batch_size" else 0):
            kind = "positive" if k == "batch_size" else "non-negative"
            raise RecipeError(f"{_where(source, f'calibration.{k}')}: expected a {kind} integer, got {v!r}")
    recipe.calibration = dict(calibration)
    if data.get("budget") is not None:
        recipe.budget = _check_budget(source, data["budget"])
    return recipe


def _check_budget(source: str, budget: Any) -> dict[str, Any]:
    """``budget: {params_ratio: r}`` or ``{macs_ratio: r}`` with r in (0, 1], plus optional
    ``sensitivity`` (model / layer), ``candidates`` (ranks measured per layer), ``cp_iterations``,
    ``scan_samples`` (calibration samples the per-layer scan runs on)."""
    where = _where(source, "budget")
    if not isinstance(budget, dict):
        raise RecipeError(f"{where}: expected a mapping such as {{params_ratio: 0.1}} or {{macs_ratio: 0.5}}")
    for k in budget:
        if k not in BUDGET_KEYS:
            hint = difflib.get_close_matches(str(k), sorted(BUDGET_KEYS), n=1)
            raise RecipeError(f"{where}: unknown key {k!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                              f"allowed: {', '.join(sorted(BUDGET_KEYS))}")
    targets = [k for k in ("params_ratio", "macs_ratio") if k in budget]
    if len(targets) != 1:
        raise RecipeError(f"{where}: give exactly one of params_ratio or macs_ratio"
                          f"{' (not both)' if targets else ''}, e.g. budget: {{params_ratio: 0.1}}")
    ratio = budget[targets[0]]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise RecipeError(f"{where}.{targets[0]}: expected a number in (0, 1] (compressed / original), got {ratio!r}")
    if budget.get("sensitivity", "model") not in ("model", "kl", "layer"):
        raise RecipeError(f"{where}.sensitivity: expected 'model', 'kl' or 'layer', got {budget['sensitivity']!r}")
    for k, low in (("candidates", 2), ("cp_iterations", 1), ("scan_samples", 1)):
        v = budget.get(k, low)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise RecipeError(f"{where}.{k}: expected an integer ≥ {low}, got {v!r}")
    return dict(budget)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], source: str = "--set") -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to parsed recipe YAML (values parsed as YAML).

    Paths use dots; list items by index (``layers.0.rank=4``); mappings are created as needed
    (``defaults.Linear.rank=4``).
    """
    data = copy.deepcopy(data)
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or not path.strip():
            raise RecipeError(f"{source} {item!r}: expected key.path=value, e.g. defaults.Linear.rank=4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise RecipeError(f"{source} {item!r}: the value is not valid YAML") from None
        parts = path.strip().split(".")
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"{source} {item!r}: {where}: no list item {part!r} (the list has {len(node)})")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise RecipeError(f"{source} {item!r}: {'.'.join(parts[:depth])} is a value, not a mapping or list")
    return data


# The recipe of ``--budget`` without ``--recipe``: a sensible method per layer type, ranks left to
# the budget. Low-rank (truncated SVD) for Linear layers: exact at full rank and never slower than
# dense at a rank that saves parameters; Tucker-2 for convolutions (a 1×1 conv becomes its truncated
# SVD). Embeddings stay dense: tables are often tied to the output head.
DEFAULT_METHODS: dict[str, dict[str, Any]] = {"Linear": {"method": "lowrank"}, "Conv2d": {"method": "tucker2"}}


def parse_budget_option(text: str, flag: str = "--budget") -> dict[str, float]:
    """``params:0.5`` / ``macs:0.5`` (a bare number is a parameter ratio) → the recipe's budget target."""
    raw = str(text).strip()
    metric, sep, value = raw.partition(":")
    if not sep:
        metric, value = "params", raw
    metric = metric.strip().lower()
    if metric not in ("params", "macs"):
        raise RecipeError(f"{flag} {raw!r}: expected params:R or macs:R with R in (0, 1], e.g. {flag} params:0.5")
    try:
        ratio = float(value)
    except ValueError:
        raise RecipeError(f"{flag} {raw!r}: {value.strip()!r} is not a number; e.g. {flag} {metric}:0.5") from None
    if not 0 < ratio <= 1:
        raise RecipeError(f"{flag} {raw!r}: the ratio is compressed / dense, in (0, 1]; e.g. {flag} {metric}:0.5")
    return {f"{metric}_ratio": ratio}


DEFAULT_SOURCE = "the default recipe (low-rank Linear layers, Tucker-2 convolutions)"


def default_recipe(overrides: Sequence[str] = ()) -> Recipe:
    """:data:`DEFAULT_METHODS` as a recipe without a budget (a sweep sets ranks or budgets per point)."""
    data: dict[str, Any] = {"version": RECIPE_VERSION, "defaults": copy.deepcopy(DEFAULT_METHODS)}
    return parse_recipe(apply_overrides(data, overrides) if overrides else data, source=DEFAULT_SOURCE)


def build_recipe(path: str | Path | None = None, overrides: Sequence[str] = (), budget: str | None = None) -> Recipe:
    """The recipe of a command: the file (with ``--set`` overrides), its budget target replaced by
    ``--budget`` when given; without a file, :data:`DEFAULT_METHODS` under that budget."""
    if path is None:
        if budget is None:
            raise RecipeError("give a recipe (--recipe FILE) or a budget (--budget params:0.5 or --budget macs:0.5)")
        data: dict[str, Any] = {"version": RECIPE_VERSION, "defaults": copy.deepcopy(DEFAULT_METHODS),
                                "budget": parse_budget_option(budget)}
        if overrides:
            data = apply_overrides(data, overrides)
        return parse_recipe(data, source=f"--budget {budget}")
    if budget is None:
        return load_recipe(path, overrides)
    data = read_recipe_data(Path(path))
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with 'version: 1'")
    old = data.get("budget")
    kept = {k: v for k, v in old.items() if k not in ("params_ratio", "macs_ratio")} if isinstance(old, dict) else {}
    data["budget"] = {**kept, **parse_budget_option(budget)}
    if overrides:
        data = apply_overrides(data, overrides)
    return parse_recipe(data, source=str(path))


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    data = read_recipe_data(path)
    if overrides:
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a YAML mapping with 'version: 1'")
        data = apply_overrides(data, overrides)
    return parse_recipe(data, source=str(path))


def read_recipe_data(path: Path) -> Any:
    """A recipe file's YAML, or a one-line error."""
    if path.is_dir():
        raise RecipeError(f"{path}: is a folder, not a recipe file")
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        raise RecipeError(f"{path}: the recipe is empty; start with 'version: 1'")
    return data


def _hint(value: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, names, n=3, cutoff=0.5)
    return f"; closest layers: {', '.join(close)}" if close else f"; layers are named like {', '.join(names[:3])}"


def _factorized_hint(recipe: Recipe, what: str, named: Sequence[str], factorized: Mapping[str, str]) -> None:
    """Raise the error for a rule (or exclude entry) that names only layers which are already
    factorized (a compressed model decomposed again): "matches no layer" would be misleading."""
    hits = [f"{name} ({factorized[name]})" for name in named]
    if hits:
        shown = ", ".join(hits[:3]) + (f" and {len(hits) - 3} more" if len(hits) > 3 else "")
        raise RecipeError(f"{recipe.source}: {what} names {shown}, already factorized; rules apply to dense "
                          "layers only (decompose the original dense model with the recipe instead)")


def match_layers(recipe: Recipe, layers: Sequence[tuple[str, str]],
                 factorized: Mapping[str, str] | None = None) -> list[LayerChoice]:
    """Match the recipe against ``(qualified name, type name)`` pairs of the decomposable layers;
    ``factorized`` (name → method of the layers a model already has factorized) only makes the
    error for a rule that names one of those say so.

    Raises :class:`RecipeError` for a rule or exclude entry that matches nothing.
    """
    factorized = factorized or {}
    names = [n for n, _ in layers]
    used_rules: set[int] = set()
    used_excludes: set[str] = set()
    ordered = sorted(recipe.rules, key=lambda r: (TIER_RANK[r.selector], r.index))
    choices = []
    for name, type_name in layers:
        settings = dict(recipe.defaults.get(type_name, {}))
        labels = [f"defaults.{type_name}"] if type_name in recipe.defaults else []
        for rule in ordered:
            if rule.matches(name, type_name):
                used_rules.add(rule.index)
                if "method" in rule.settings and rule.settings["method"] != settings.get("method"):
                    settings = {}  # a new method: lower tiers' settings were meant for another method
                settings.update(rule.settings)
                labels.append(rule.label)
        excluded_by = None
        for pattern in recipe.exclude:
            if name == pattern or fnmatch.fnmatchcase(name, pattern):
                used_excludes.add(pattern)
                excluded_by = excluded_by or f"exclude: {pattern}"
        choices.append(LayerChoice(name, type_name, settings, labels, labels[-1] if labels else None, excluded_by))

    for rule in recipe.rules:
        if rule.index not in used_rules:
            if rule.selector == "type":
                example = next(iter(factorized.items()), None)
                already = (f" (its already factorized layers, e.g. {example[0]} ({example[1]}), are not dense layers: "
                           "rules apply to dense layers only)" if example else "")
                raise RecipeError(f"{recipe.source}: {rule.label} matches no layer: the model has no {rule.value} "
                                  f"layers that can be decomposed{already}")
            named = [n for n in factorized if rule.matches(n, rule.type_filter or "")]
            _factorized_hint(recipe, rule.label, named, factorized)
            raise RecipeError(f"{recipe.source}: {rule.label} matches no layer{_hint(rule.value, names)}")
    for pattern in recipe.exclude:
        if pattern not in used_excludes:
            named = [n for n in factorized if n == pattern or fnmatch.fnmatchcase(n, pattern)]
            _factorized_hint(recipe, f"exclude entry {pattern!r}", named, factorized)
            raise RecipeError(f"{recipe.source}: exclude entry {pattern!r} matches no layer{_hint(pattern, names)}")
    return choices
