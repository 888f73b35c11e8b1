"""Self-validating hyperparameter dataclasses: every field carries its help text and its rule.

Example::

    @dataclass
    class MyConfig(Config):
        steps: int = param(25, "Adam steps", min=1)
        dtype: str = param("model", "dtype of the pass", choices=("model", "float32"))

    MyConfig.from_dict({"steps": 10})      # unknown keys, wrong types, out-of-range values: HyperparameterError

Types come from the annotations (int, float, str, bool, tuple[int, ...], tuple[tuple[int, int], ...]);
ranges and choices from the field's metadata. ``describe()`` lists name, default and help (``lmedit
edit --list-hparams``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from lmedit.errors import HyperparameterError


def param(default: Any, help: str, *, min: float | None = None, gt: float | None = None,
          choices: tuple | None = None) -> Any:
    """A dataclass field with help text and an optional range (``min`` inclusive, ``gt`` exclusive) or choices."""
    meta = {"help": help, "min": min, "gt": gt, "choices": choices}
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple default")
    return field(default=default, metadata=meta)


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """``value`` as the annotated type ``kind``, or a HyperparameterError naming the field."""
    def bad(what: str) -> HyperparameterError:
        return HyperparameterError(f"{name} = {value!r}: must be {what}, got {type(value).__name__}")

    if kind is bool:
        if isinstance(value, (str, bytes)) or value not in (True, False):
            raise bad("a bool")
        return bool(value)
    if kind in (int, float):
        if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
            raise bad("an int" if kind is int else "a float")
        if kind is int:
            if float(value) != int(float(value)):
                raise bad("a whole number")
            return int(float(value))
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise bad("a list")
        items = list(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(items))
        if len(items) != len(args):
            raise bad(f"a list of {len(args)} values")
        return tuple(_coerce(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(items, args)))
    return value


@dataclass(frozen=True)
class Config:
    """Base of lmedit's hyperparameter dataclasses (frozen: change a value with ``replace``)."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            given = getattr(self, f.name)
            value = _coerce(f"{type(self).__name__}.{f.name}", given, hints[f.name])
            object.__setattr__(self, f.name, value)
            self._check_range(f, value, given)
        self.validate()

    def _check_range(self, f: dataclasses.Field, value: Any, given: Any) -> None:
        m = f.metadata
        rule = None
        if m.get("choices") is not None and value not in m["choices"]:
            rule = "one of " + ", ".join(map(str, m["choices"]))
        elif m.get("min") is not None and isinstance(value, (int, float)) and value < m["min"]:
            rule = f">= {m['min']}"
        elif m.get("gt") is not None and isinstance(value, (int, float)) and not value > m["gt"]:
            rule = f"> {m['gt']}"
        if rule:
            self.fail(f.name, rule, given)

    def fail(self, name: str, rule: str, given: Any = None) -> None:
        """Raise a HyperparameterError naming the field, the value as given and the rule."""
        shown = getattr(self, name) if given is None else given
        raise HyperparameterError(f"{type(self).__name__}.{name} = {shown!r}: must be {rule}")

    def validate(self) -> None:
        """Checks across fields (subclasses extend it); single-field rules live in the metadata."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise HyperparameterError(f"unknown hyperparameter(s) {', '.join(unknown)} for {cls.__name__}; "
                                      f"known: {', '.join(cls.field_names())}")
        return cls(**values)

    def replace(self, **changes: Any):
        """A copy with ``changes`` (validated like a new instance; unknown names refused)."""
        return type(self).from_dict({**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples as lists)."""
        def plain(v: Any) -> Any:
            return [plain(x) for x in v] if isinstance(v, tuple) else v
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """(name, default, help) per field, in declaration order."""
        return [(f.name, f.default, f.metadata.get("help", "")) for f in fields(cls)]
