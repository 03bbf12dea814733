"""Values from a file (a checkpoint's settings and state) checked against the types their settings declare.

Only plain data passes: bool, int, float, str, None, and lists and mappings of them where the type says so. A
string stays a string: it is never read as YAML, a file or an import path. Types that name objects (a
``torch.device``, a ``Callback``) accept no value from a file; a ``Matching`` type accepts the strings of a pattern.
"""

import inspect
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence

import yaml

MAX_STRING = 1000  # characters: no setting of this project is longer
MAX_YAML_BYTES = 64 * 1024  # a run's config (config.yaml, or the one in a checkpoint) is ~2-3 KB
MAX_YAML_DEPTH = 8  # levels of nesting: a run's config goes 6 deep (trainer.callbacks[0].init_args.duration)


class SchemaError(ValueError):
    """A value that does not fit its setting: ``key`` names it, the message says why."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


class Matching(str):
    """A string type: the strings that match its pattern whole. ``Matching.of(regex, "what it is")`` makes one."""

    pattern: re.Pattern

    @classmethod
    def of(cls, regex: str, what: str) -> type:
        return type(what, (cls,), {"pattern": re.compile(regex)})


def plain_yaml(text: str) -> object:
    """YAML as plain data, its work bounded: SchemaError if over MAX_YAML_BYTES, nested deeper than MAX_YAML_DEPTH,
    or with anchors and aliases (a few aliases can stand for billions of copies); yaml.YAMLError if not YAML."""

    def refuse(why: str):
        raise SchemaError("the file", why)

    if not isinstance(text, str):
        refuse("not a YAML text")
    if len(text) > MAX_YAML_BYTES:
        refuse(f"{len(text)} characters, more than the {MAX_YAML_BYTES} a run's config takes")
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            refuse("it uses YAML anchors or aliases, which a run's config never does")
        depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
        if depth > MAX_YAML_DEPTH:
            refuse(f"nested deeper than {MAX_YAML_DEPTH} levels")
    return yaml.safe_load(text)


def shown(value) -> str:
    """A value as an error line quotes it: short, whatever its size."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def accepts(hint, value) -> bool:
    """Whether ``value`` is a plain value of the type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:  # only where a setting's own check follows (e.g. a net's options)
        return False
    if hint is None or hint is type(None):
        return value is None
    if isinstance(hint, type) and issubclass(hint, Matching):
        return isinstance(value, str) and len(value) <= MAX_STRING and bool(hint.pattern.fullmatch(value))
    if origin is typing.Union or origin is types.UnionType:
        return any(accepts(arg, value) for arg in args)
    if origin is typing.Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if hint is bool:
        return type(value) is bool
    if hint is int:
        return type(value) is int
    if hint is float:
        return type(value) in (int, float) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str) and len(value) <= MAX_STRING
    if hint is dict:  # a mapping whose contents a setting's own check reads (e.g. a net's options)
        return isinstance(value, dict)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[float, float]: a fixed length
            return len(value) == len(args) and all(accepts(a, v) for a, v in zip(args, value))
        item = args[0] if args else typing.Any
        return all(accepts(item, v) for v in value)
    if origin in (dict, Mapping):
        key_type, value_type = args
        return isinstance(value, dict) and all(
            accepts(key_type, k) and accepts(value_type, v) for k, v in value.items()
        )
    return False  # a class (Callback, torch.device, timedelta ...): not from a file


def check(value, hint, key: str) -> None:
    """SchemaError unless ``value`` is a plain value of the type ``hint``."""
    if not accepts(hint, value):
        raise SchemaError(key, f"{shown(value)} is not {describe(hint)}")


def describe(hint) -> str:
    """A type in words, for an error line."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(describe(arg) for arg in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if hint is None or hint is type(None):
        return "null"
    if origin in (list, tuple, Sequence):
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin in (dict, Mapping):
        return f"a mapping of {describe(args[1])}"
    return getattr(hint, "__name__", repr(hint))


def signature_types(function) -> dict[str, object]:
    """The declared types of a function's (a class's constructor's) keyword arguments."""
    function = function.__init__ if inspect.isclass(function) else function
    hints = typing.get_type_hints(function)
    parameters = inspect.signature(function).parameters
    return {
        name: hints.get(name, typing.Any)
        for name, p in parameters.items()
        if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def check_mapping(values, allowed: dict[str, object], key: str) -> None:
    """SchemaError unless ``values`` is a mapping whose keys are among ``allowed`` (name -> type) and whose
    values are of those types."""
    if not isinstance(values, dict):
        raise SchemaError(key, f"{shown(values)} is not a mapping")
    for name, value in values.items():
        name_shown = name if isinstance(name, str) and len(name) <= 60 else shown(name)
        where = f"{key}.{name_shown}" if key else name_shown
        if name not in allowed:
            raise SchemaError(where, "not a setting this version knows")
        check(value, allowed[name], where)
