"""Settings validated by pydantic v2 and reported as one line.

Settings are frozen dataclasses whose field annotations carry the rules: ``Strict`` types (JSON
``"5"`` is not an integer, ``1`` is not ``true``), :class:`Range`, :class:`OneOf` and
:class:`Rule` metadata, and :data:`CONFIG` (unknown keys and non-finite numbers are errors).
Pydantic reads those annotations to validate JSON objects and to write the JSON Schema that
editors use; :func:`user_error` turns its report into one line naming the key, the bad value
and what is allowed. Plain construction in code (``TrainConfig(seed=3)``,
``dataclasses.replace``) stays unvalidated and cheap: only user input goes through here.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    GetCoreSchemaHandler,
    Strict,
    TypeAdapter,
    ValidationError,
)
from pydantic import create_model as _create_model
from pydantic.json_schema import GetJsonSchemaHandler, JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from core.errors import UserError, did_you_mean

# unknown keys and NaN/Infinity are errors everywhere
CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)
# the largest integer most settings may take: torch and numpy index with 32/64-bit integers
INT_MAX = 2**31 - 1
# numpy's and torch's seeding takes 0..2**32-1
SEED_MAX = 2**32 - 1
UNKNOWN_KEY = ("extra_forbidden", "unexpected_keyword_argument")

Text = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]


def _fail(allowed: str, value: Any) -> PydanticCustomError:
    # the value as validated (an integer given for a number shows as 1.0), for the message
    return PydanticCustomError("allowed", allowed, {"value": value})


@dataclass(frozen=True)
class Range:
    """A strict int or float in [lo, hi] (either end open, or None for unbounded)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    allowed: str | None = None  # the phrase shown after "is invalid;"; default: the range

    def text(self, integer: bool) -> str:
        if self.allowed:
            return self.allowed
        kind = "integer" if integer else "number"

        def num(x: float) -> str:
            return str(int(x)) if integer else f"{x:g}"

        lo, hi = self.lo, self.hi
        if hi is None:
            if lo == 0:
                return f"use a positive {kind}" if self.lo_open else f"use a {kind} >= 0"
            return f"use a {kind} {'>' if self.lo_open else '>='} {num(lo or 0)}"
        if integer and lo is not None and not (self.lo_open or self.hi_open):
            return f"use an integer in {num(lo)}..{num(hi)}"
        left = "(" if self.lo_open else "["
        right = ")" if self.hi_open else "]"
        low = "-inf" if lo is None else num(lo)
        return f"use a value in {left}{low}, {num(hi)}{right}"

    def inside(self, v: float) -> bool:
        lo, hi = self.lo, self.hi
        if lo is not None and (v <= lo if self.lo_open else v < lo):
            return False
        return not (hi is not None and (v >= hi if self.hi_open else v > hi))

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        inner = typing.cast(CoreSchema, {**handler(source), "strict": True})
        integer = source is int

        def check(v: float) -> float:
            if not self.inside(v):
                raise _fail(self.text(integer), v)
            return v

        return core_schema.no_info_after_validator_function(check, inner)

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        js = handler(schema)
        if self.lo is not None:
            js["exclusiveMinimum" if self.lo_open else "minimum"] = self.lo
        if self.hi is not None:
            js["exclusiveMaximum" if self.hi_open else "maximum"] = self.hi
        return js


@dataclass(frozen=True)
class OneOf:
    """A string from a fixed list; a typo gets a did-you-mean."""

    options: tuple[str, ...]

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        def check(v: str) -> str:
            if v not in self.options:
                hint = did_you_mean(v, self.options)
                raise _fail(f"use one of {', '.join(self.options)}{hint}", v)
            return v

        return core_schema.no_info_after_validator_function(
            check, core_schema.str_schema(strict=True)
        )

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return handler(schema) | {"enum": list(self.options)}


@dataclass(frozen=True)
class Rule:
    """Any other check of one value: `ok(value)` or the error says `allowed`."""

    ok: Callable[[Any], bool]
    allowed: str

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        def check(v: Any) -> Any:
            if not self.ok(v):
                raise _fail(self.allowed, v)
            return v

        return core_schema.no_info_after_validator_function(check, handler(source))


Seed = Annotated[int, Range(0, SEED_MAX, allowed=f"use a seed in 0..{SEED_MAX} (2**32 - 1)")]


def has_control_chars(text: str) -> bool:
    return any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)


MAX_NAME = 100  # characters of a user-chosen name that becomes part of a file or folder name
NAME_RULE = (
    f"it becomes a folder or file name: at most {MAX_NAME} characters, no '/', '\\', '..' "
    "or control characters"
)


def safe_name(name: str) -> bool:
    """A user's name (a tag, a checkpoint comment) can become one path component: nothing in
    it leaves the folder it is written into."""
    return (
        len(name) <= MAX_NAME
        and not any(c in name for c in "/\\")
        and ".." not in name
        and name != "."
        and not has_control_chars(name)
    )


PathText = Annotated[
    str, Strict(), Rule(lambda s: not has_control_chars(s), "use a path without control characters")
]


# ---------------------------------------------------------------------------------------------
# Turning pydantic's report into one line


def key_label(key: str) -> str:
    return f"key '{key}':"


def _strip(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _members(tp: Any) -> list[Any]:
    tp = _strip(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [_strip(a) for a in typing.get_args(tp)]
    return [tp]


def _fields(tp: Any) -> dict[str, Any] | None:
    """The keys a settings class takes and their annotations; None if tp is no such class."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return {k: f.annotation for k, f in tp.model_fields.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        hints = typing.get_type_hints(tp, include_extras=True)
        return {f.name: hints[f.name] for f in dataclasses.fields(tp)}
    return None


def _child(tp: Any, part: str | int) -> Any:
    for m in _members(tp):
        fields = _fields(m)
        origin = typing.get_origin(m)
        if fields is not None and part in fields:
            return fields[part]
        if origin is list and isinstance(part, int):
            return typing.get_args(m)[0]
        if origin is dict and isinstance(part, str):
            return typing.get_args(m)[1]
    return Any


def type_name(tp: Any) -> str:
    names = []
    for m in _members(tp):
        origin = typing.get_origin(m)
        if m is type(None):
            names.append("null")
        elif origin is list:
            names.append(f"list of {type_name(typing.get_args(m)[0])}")
        elif origin is dict or _fields(m) is not None:
            names.append("object")
        else:
            names.append(
                {int: "integer", float: "number", str: "string", bool: "true/false"}.get(
                    m, getattr(m, "__name__", str(m))
                )
            )
    return " or ".join(names)


def _resolve(loc: tuple[str | int, ...], data: Any) -> tuple[list[str | int], Any]:
    """The key path and the value an error is about: loc also holds pydantic's names of union
    members and validators, which are not keys of the input."""
    path: list[str | int] = []
    cur = data
    for part in loc:
        in_dict = isinstance(cur, dict) and part in cur
        in_list = isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur)
        if in_dict or in_list:
            cur = cur[part]
            path.append(part)
    return path, cur


def dotted(path: list[str | int], prefix: str = "") -> str:
    out = prefix
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def user_error(
    err: ValidationError,
    data: Any,
    root: Any,
    where: str = "",
    prefix: str = "",
    label: Callable[[str], str] = key_label,
) -> UserError:
    """One line for pydantic's report on `data` (validated as `root`): unknown keys first, then
    the most specific problem (deepest key; a broken rule before a wrong type)."""
    rank = {"allowed": 0, "finite_number": 1}
    found = []
    for n, e in enumerate(err.errors(include_url=False)):
        path, value = _resolve(e["loc"], data)
        unknown = e["type"] in UNKNOWN_KEY
        found.append((not unknown, -len(path), rank.get(e["type"], 2), n, e, path, value))
    *_, e, path, value = min(found, key=lambda f: f[:4])
    key = dotted(path, prefix)
    if e["type"] in UNKNOWN_KEY:
        parent = root
        for p in path[:-1]:
            parent = _child(parent, p)
        valid = next((list(f) for m in _members(parent) if (f := _fields(m)) is not None), [])
        name = str(path[-1])
        hint = f"; valid keys: {', '.join(valid)}" if valid else "; it takes no keys"
        return UserError(f"{where}unknown key '{key}'{did_you_mean(name, valid)}{hint}")
    if e["type"] == "allowed":
        allowed = e["msg"]
        value = e.get("ctx", {}).get("value", value)
    elif e["type"] == "finite_number":
        allowed = "use a finite number"
    else:
        tp = root
        for p in path:
            tp = _child(tp, p)
        allowed = f"expected {type_name(tp)}"
    return UserError(f"{where}{label(key)} {value!r} is invalid; {allowed}")


def validate(
    cls: type,
    data: Any,
    where: str = "",
    prefix: str = "",
    label: Callable[[str], str] = key_label,
) -> Any:
    """`data` (a JSON object) as an instance of the settings class `cls`, or one UserError."""
    try:
        return adapter(cls).validate_python(data)
    except ValidationError as e:
        raise user_error(e, data, cls, where, prefix, label) from None


@functools.cache
def adapter(cls: Any) -> TypeAdapter[Any]:
    return TypeAdapter(cls)


# ---------------------------------------------------------------------------------------------
# Dataclasses that are not annotated for pydantic (a method's own settings)


def _strict_field(tp: Any) -> Any:
    base = _strip(tp)
    if base is int:
        return Annotated[int, Range(-INT_MAX - 1, INT_MAX)]
    return tp


@functools.cache
def model_of(cls: type) -> type[BaseModel]:
    """A strict pydantic model with the fields, types and defaults of the dataclass `cls`.

    Strict as JSON allows (``"2"`` is not a number; ``2`` is one); unknown keys and
    non-finite numbers fail; integers stay within the 32-bit range the code can use."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...
        fields[f.name] = (_strict_field(hints[f.name]), default)
    config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True, title=cls.__name__)
    return _create_model(cls.__name__, __config__=config, **fields)


def validate_plain(cls: type, data: dict[str, Any], where: str = "", prefix: str = "") -> Any:
    """`data` as an instance of the plain frozen dataclass `cls` (validated via model_of)."""
    model = model_of(cls)
    try:
        m = model.model_validate(data)
    except ValidationError as e:
        raise user_error(e, data, model, where, prefix) from None
    return cls(**{k: getattr(m, k) for k in model.model_fields})
