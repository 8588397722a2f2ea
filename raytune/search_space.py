"""The sweep's search space: ``tune.search_space`` entries → Ray Tune distributions.

A search space maps a dotted job-spec key to one distribution written as a one-key
mapping::

    optim.lr:            {loguniform: [1.0e-5, 1.0e-2]}
    optim.warmup_ratio:  {uniform: [0.0, 0.1]}
    lora.r:              {grid: [4, 8, 16]}
    lora.target_modules: {choice: [all-linear, [q_proj, v_proj]]}
    optim.batch_size:    {randint: [2, 9]}     # hi excluded, as in ``tune.randint``

Everything here is pure: the checks run before Ray starts, and every problem is a
``ConfigError`` naming ``tune.search_space.<key>``.
"""

from __future__ import annotations

import math
from typing import Any

from rayft.trainers.config import ConfigError, has_key, set_dotted, validate_spec

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint", "grid")
"""Every distribution a search-space entry may name."""

FINITE = ("choice", "grid")
"""Distributions with a finite list of values (the only ones ``search: grid`` accepts)."""

# Sections a trial cannot vary: they name the sweep itself or where it writes.
FIXED_PREFIXES = ("tune.", "output.", "storage")

# An interior point of a continuous range, away from "round" fractions: checking it
# catches a continuous distribution on an integer key (e.g. uniform over lora.r),
# which the range's end points alone would let through.
_INTERIOR = 0.3719


def space_key(key: str) -> str:
    """The dotted name a problem with search-space entry ``key`` is reported under."""
    return f"tune.search_space.{key}"


def flatten_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The search space keyed by dotted keys.

    Entries may be written flat (``optim.lr: {...}``) or nested by section
    (``optim: {lr: {...}}``, which is also what a command-line override such as
    ``tune.search_space.optim.lr={loguniform: [1e-5, 1e-3]}`` produces).
    """
    out: dict[str, Any] = {}
    for key, entry in space.items():
        name = f"{prefix}{key}"
        is_section = (
            isinstance(entry, dict)
            and entry
            and not any(k in DISTRIBUTIONS for k in entry)
            and all(isinstance(v, dict) for v in entry.values())
        )
        if is_section:
            out.update(flatten_space(entry, f"{name}."))
        else:
            out[name] = entry
    return out


def parse_entry(key: str, entry: Any) -> tuple[str, list[Any]]:
    """Check the shape of one search-space entry and return ``(distribution, arguments)``.

    Args:
        key: The dotted job-spec key the entry varies.
        entry: The entry as written, e.g. ``{"loguniform": [1e-5, 1e-2]}``.

    Raises:
        ConfigError: The entry is not one known distribution with valid arguments.
    """
    where = space_key(key)
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ConfigError(
            [
                (
                    where,
                    "a distribution is a mapping with exactly one of "
                    f"{', '.join(DISTRIBUTIONS)}; got {entry!r}",
                )
            ]
        )
    ((kind, args),) = entry.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(
            [(where, f"unknown distribution {kind!r}; use one of {', '.join(DISTRIBUTIONS)}")]
        )
    if kind in FINITE:
        if not isinstance(args, list) or not args:
            raise ConfigError([(where, f"{kind} takes a non-empty list of values, got {args!r}")])
        return kind, list(args)
    return kind, _range_arguments(where, kind, args)


def _range_arguments(where: str, kind: str, args: Any) -> list[Any]:
    """``[lo, hi]`` of a range distribution (``uniform``, ``loguniform``, ``randint``).

    Raises:
        ConfigError: ``args`` are not two numbers that make a non-empty range of ``kind``.
    """
    if not (isinstance(args, list) and len(args) == 2 and all(_is_number(a) for a in args)):
        raise ConfigError([(where, f"{kind} takes [lo, hi] (two numbers), got {args!r}")])
    lo, hi = args
    if kind == "randint":
        if not all(isinstance(a, int) for a in args):
            raise ConfigError([(where, f"randint takes two integers [lo, hi), got {args!r}")])
        if hi - lo < 1:
            raise ConfigError([(where, f"randint needs lo < hi (hi is excluded), got {args!r}")])
        return [lo, hi]
    if not lo < hi:
        raise ConfigError([(where, f"{kind} needs lo < hi, got {args!r}")])
    if kind == "loguniform" and lo <= 0:
        raise ConfigError([(where, f"loguniform needs 0 < lo < hi, got {args!r}")])
    return [float(lo), float(hi)]


def probe_values(kind: str, args: list[Any]) -> list[Any]:
    """Values that stand for everything a distribution can produce.

    Finite distributions give all their values; ranges give both ends and an interior
    point (``randint``: its lowest, highest and an interior integer).
    """
    if kind in FINITE:
        return list(args)
    lo, hi = args
    if kind == "randint":
        return sorted({lo, hi - 1, lo + (hi - 1 - lo) // 2})
    if kind == "loguniform":
        inner = math.exp(math.log(lo) + _INTERIOR * (math.log(hi) - math.log(lo)))
    else:
        inner = lo + _INTERIOR * (hi - lo)
    return [lo, inner, hi]


def validate_search_space(base: dict[str, Any], space: dict[str, Any]) -> None:
    """Check every entry of ``space`` against the job-spec schema, before any trial starts.

    Each key must name a leaf of the schema that a trial may vary; each value a
    distribution can produce is set into ``base`` (the job spec as a plain dict) with
    ``set_dotted`` and the result must pass ``validate_spec``.

    Args:
        base: The sweep's job spec as a plain dict.
        space: ``tune.search_space`` as written.

    Raises:
        ConfigError: Listing every problem, each under ``tune.search_space.<key>``.
    """
    problems: list[tuple[str, str]] = []
    if not space:
        problems.append(
            (
                "tune.search_space",
                "a sweep needs at least one key to search over, "
                "e.g. optim.lr: {loguniform: [1.0e-5, 1.0e-2]}",
            )
        )
    for key, entry in space.items():
        where = space_key(key)
        if not has_key(key):
            problems.append(
                (
                    where,
                    f"{key!r} is not a job-spec key (`rayft validate --schema` lists every key)",
                )
            )
            continue
        if key.startswith(FIXED_PREFIXES):
            problems.append(
                (
                    where,
                    f"{key!r} names the sweep itself or its storage and cannot vary between trials",
                )
            )
            continue
        try:
            kind, args = parse_entry(key, entry)
        except ConfigError as err:
            problems += err.problems
            continue
        # The sweep section is dropped from a trial's spec; validate without it.
        trial_base = {k: v for k, v in base.items() if k != "tune"}
        for value in probe_values(kind, args):
            try:
                validate_spec(set_dotted(trial_base, key, value))
            except ConfigError as err:
                reasons = "; ".join(f"{k or '<root>'}: {m}" for k, m in err.problems)
                problems.append(
                    (where, f"{kind} value {value!r} is rejected by the job spec ({reasons})")
                )
                break
    if problems:
        raise ConfigError(problems)


def to_tune(space: dict[str, Any], search: str = "random") -> dict[str, Any]:
    """Translate a validated search space into a Tune ``param_space`` keyed by dotted key.

    Args:
        space: ``tune.search_space`` (already checked by ``validate_search_space``).
        search: ``tune.search``; ``grid`` turns ``choice`` lists into grids as well and
            refuses continuous ranges, model-based searchers refuse ``grid``.

    Returns:
        ``{dotted_key: tune distribution}``, ready for ``Tuner(param_space=...)``.

    Raises:
        ConfigError: A distribution the chosen search cannot use.
    """
    from ray import tune

    out: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for key, entry in space.items():
        kind, args = parse_entry(key, entry)
        if search == "grid" and kind not in FINITE:
            problems.append(
                (
                    space_key(key),
                    f"search: grid enumerates values; {kind} is a "
                    "range: use {grid: [...]} or {choice: [...]}, or "
                    "tune.search=random",
                )
            )
            continue
        if search in ("optuna", "hyperopt") and kind == "grid":
            problems.append(
                (
                    space_key(key),
                    f"search: {search} samples values itself and "
                    "cannot enumerate a grid; use {choice: [...]}",
                )
            )
            continue
        if kind == "loguniform":
            out[key] = tune.loguniform(*args)
        elif kind == "uniform":
            out[key] = tune.uniform(*args)
        elif kind == "randint":
            out[key] = tune.randint(*args)
        elif kind == "grid" or (kind == "choice" and search == "grid"):
            out[key] = tune.grid_search(args)
        else:
            out[key] = tune.choice(args)
    if problems:
        raise ConfigError(problems)
    return out


def trial_values(space: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The values a trial's ``config`` gives the search-space keys, in the space's order."""
    return {key: config[key] for key in space if key in config}


def apply_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``base`` with every ``dotted.key: value`` of a trial set into it (a new dict)."""
    out = base
    for key, value in values.items():
        out = set_dotted(out, key, value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
