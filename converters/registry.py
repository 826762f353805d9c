"""The pass registry: pass names → (config dataclass, run function), so that a profile's pipeline is data.

Each pass module registers itself with :func:`register` at import; :func:`load_builtin_passes` imports them
(cheap: their heavy imports live inside functions). Options from a profile's ``[passes.NAME]`` table are turned
into the pass's frozen config dataclass by :func:`make_config`, which rejects unknown keys and wrong types with
a :class:`ProfileError`, so a typo in a profile fails before anything is built.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeops.errors import ProfileError

if TYPE_CHECKING:
    from converters.model_types import ModelState
    from converters.pass_context import PassContext

__all__ = ["PASS_ORDER", "PassSpec", "get_pass", "load_builtin_passes", "make_config", "register", "registered"]

PASS_ORDER = ("prune", "convert", "quantize", "validate", "benchmark", "package", "sign")
"""Every pipeline runs its passes in this relative order; convert, validate, package and sign are required."""
REQUIRED_PASSES = ("convert", "validate", "package", "sign")

RunFn = Callable[["PassContext", "ModelState", Any], "ModelState"]


@dataclass(frozen=True)
class PassSpec:
    name: str
    config_cls: type
    run: RunFn
    description: str
    needs: str | None = None  # the data the pass needs: "calib", "eval", "train" or None


_REGISTRY: dict[str, PassSpec] = {}


def register(name: str, config_cls: type, description: str, *, needs: str | None = None) -> Callable[[RunFn], RunFn]:
    """Decorator registering ``run`` as pass ``name`` with config dataclass ``config_cls``."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{config_cls!r} is not a dataclass")

    def deco(run: RunFn) -> RunFn:
        if name in _REGISTRY and _REGISTRY[name].run is not run:
            raise RuntimeError(f"pass {name!r} registered twice")
        _REGISTRY[name] = PassSpec(name, config_cls, run, description, needs)
        return run

    return deco


def load_builtin_passes() -> None:
    for name in PASS_ORDER:
        importlib.import_module(f"converters.{name}")


def registered() -> dict[str, PassSpec]:
    load_builtin_passes()
    return dict(_REGISTRY)


def get_pass(name: str) -> PassSpec:
    load_builtin_passes()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ProfileError(f"unknown pass {name!r} (known: {', '.join(PASS_ORDER)})") from None


def _accepts(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (tuple, list):
        (inner, *_) = typing.get_args(hint) or (Any,)
        return isinstance(value, (list, tuple)) and all(_accepts(v, inner) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def make_config(name: str, options: Mapping[str, Any]) -> Any:
    """Build pass ``name``'s config from profile options. Raises ProfileError on unknown keys or bad types."""
    spec = get_pass(name)
    hints = typing.get_type_hints(spec.config_cls)
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ProfileError(f"pass {name!r} has no option(s) {unknown} (options: {sorted(fields)})")
    for key, value in options.items():
        if not _accepts(value, hints[key]):
            raise ProfileError(f"pass {name!r} option {key!r}: {value!r} is not {hints[key]}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return spec.config_cls(**values)


def describe(name: str) -> list[dict[str, Any]]:
    """The pass's options: name, type, default and help (from the field metadata)."""
    spec = get_pass(name)
    hints = typing.get_type_hints(spec.config_cls)
    return [
        {"name": f.name, "type": str(hints[f.name]), "default": f.default, "help": f.metadata.get("help", "")}
        for f in dataclasses.fields(spec.config_cls)
    ]
