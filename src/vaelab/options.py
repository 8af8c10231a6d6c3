"""Options declared as frozen dataclasses, with their constraints (torch-free).

Every configurable piece of vaelab declares its options as a frozen dataclass whose
fields carry their constraint in ``metadata["check"]``, in the style of
``torch.distributions``' ``arg_constraints``: the run config's sections
(:mod:`vaelab.config`) and each registered kind's own options (a likelihood family, a
prior, a model architecture, an estimator: ``Options`` beside the class). :func:`build`
turns TOML / command-line values into such a dataclass, coercing each value to the
field's declared type and checking it; a bad value is a
:class:`~vaelab.errors.ConfigError` that names the key, the rule and an example::

    @dataclass(frozen=True)
    class Options:
        components: int = option(500, positive, "pseudo-inputs K")

    build(Options, {"components": "0"}, "prior.vampprior")
    # ConfigError: prior.vampprior.components must be positive, got 0: ...

A dataclass may also define ``check(self, where) -> None`` for rules between fields (raise
:class:`ConfigError` naming the keys under ``where``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError

__all__ = [
    "NoOptions",
    "Check",
    "option",
    "build",
    "check_keys",
    "coerce",
    "to_plain",
    "validate",
    "boolean",
    "positive",
    "non_negative",
    "fraction",
    "one_of",
    "positive_sizes",
    "optional",
]

#: A constraint: returns None when ``value`` satisfies it, else the rule in words
#: ("must be positive").
Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class NoOptions:
    """The options of a kind that takes none."""


def option(default: Any, check: Check | None = None, doc: str = "") -> Any:
    """A dataclass field with a default, a constraint and a one-line description."""
    meta = {"check": check, "doc": doc}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- constraints


def _with_fix(fix: str) -> Callable[[Check], Check]:
    """Attach the fix a refusal suggests (``check.fix``)."""

    def attach(check: Check) -> Check:
        check.fix = fix  # type: ignore[attr-defined]
        return check

    return attach


@_with_fix("give true or false")
def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


@_with_fix("give a value > 0")
def positive(value: Any) -> str | None:
    return None if value > 0 else "must be positive"


@_with_fix("give a value >= 0")
def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be >= 0"


@_with_fix("give a value between 0 and 1")
def fraction(value: Any) -> str | None:
    return None if 0 < value < 1 else "must be in (0, 1)"


def one_of(*choices: Any) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(map(str, choices))}"

    check.choices = choices  # type: ignore[attr-defined]
    return check


@_with_fix("give layer sizes > 0, e.g. 512,256")
def positive_sizes(value: tuple[int, ...]) -> str | None:
    return None if all(v > 0 for v in value) else "sizes must be positive"


def optional(check: Check) -> Check:
    """``check``, or None (unset) allowed."""

    def inner(value: Any) -> str | None:
        return None if value is None else check(value)

    inner.fix = getattr(check, "fix", None)  # type: ignore[attr-defined]
    return inner


# --------------------------------------------------------------------------- building


def _example(annotation: str) -> str:
    if annotation.startswith("tuple"):
        return "512,256"
    return {"bool": "true", "int": "10", "float": "0.5"}.get(annotation.split(" ")[0], "name")


def coerce(where: str, value: Any, annotation: str) -> Any:
    """Convert a TOML/CLI value to the field's declared type (``annotation``, the string
    form of its type hint), or raise :class:`ConfigError` naming ``where``."""
    optional_type = "None" in annotation
    textual = annotation.startswith(("str", "float | str"))
    if value is None or (
        not textual and isinstance(value, str) and value.lower() in ("none", "null", "")
    ):
        if optional_type:
            return None
        raise ConfigError(f"{where} cannot be empty: give a value of type {annotation}")
    try:
        if annotation.startswith("tuple"):
            if isinstance(value, str):
                value = [v for v in value.replace("[", "").replace("]", "").split(",")
                         if v.strip()]
            if not isinstance(value, (list, tuple)):
                value = [value]
            return tuple(int(v) for v in value)
        if annotation.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            if not isinstance(value, (bool, int)):
                raise ValueError(value)
            return bool(value)
        if annotation.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if annotation.startswith("float | str"):
            if isinstance(value, bool):
                raise ValueError(value)
            try:
                return float(value)
            except (TypeError, ValueError):
                return str(value)
        if annotation.startswith("float"):
            if isinstance(value, bool):
                raise ValueError(value)
            out = float(value)
            if not math.isfinite(out):
                raise ValueError(value)
            return out
        if annotation.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where} = {value!r} is not a valid {annotation}: give e.g. "
            f"{where}={_example(annotation)}"
        ) from None
    return value


def check_keys(where: str, given: Mapping[str, Any], cls: type) -> None:
    """Every key of ``given`` is a field of ``cls``, else a ConfigError listing them."""
    valid = [f.name for f in fields(cls)]
    for key in given:
        if key not in valid:
            listed = ", ".join(valid) if valid else "none (it takes no options)"
            raise ConfigError(f"unknown config key {where}.{key}: valid keys in [{where}] are "
                              f"{listed}")


def build(cls: type, given: Mapping[str, Any], where: str, base: Any = None) -> Any:
    """``base`` (default: ``cls()``) with the values ``given`` coerced and every field's
    constraint checked.

    Raises:
        ConfigError: an unknown key (the valid ones listed), a value of the wrong type, or
            one that breaks its field's constraint or the dataclass's ``check``.
    """
    check_keys(where, given, cls)
    annotations = {f.name: str(f.type) for f in fields(cls)}
    coerced = {k: coerce(f"{where}.{k}", v, annotations[k]) for k, v in given.items()}
    out = dataclasses.replace(base if base is not None else cls(), **coerced)
    validate(out, where)
    return out


def validate(options: Any, where: str) -> None:
    """Check every field's constraint and the dataclass's own ``check``."""
    for f in fields(options):
        rule = f.metadata.get("check")
        value = getattr(options, f.name)
        if rule is None or value is None:
            continue
        broken = rule(value)
        if broken:
            shown = list(value) if isinstance(value, tuple) else value
            fix = getattr(rule, "fix", None)
            raise ConfigError(f"{where}.{f.name} {broken}, got {shown!r}"
                              + (f": {fix}" if fix else ""))
    check = getattr(options, "check", None)
    if callable(check):
        check(where)


def to_plain(options: Any) -> dict[str, Any]:
    """The dataclass as TOML/JSON-ready values: tuples as lists, unset (None) values left
    out."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(options).items() if v is not None}
