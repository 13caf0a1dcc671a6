"""Strict YAML reading, shared by the bridge config and the provider's identities files.

Two halves. :func:`strict_loader` builds a PyYAML safe loader that refuses duplicate keys
(and keys that are not plain values) in every mapping; each file format then
chooses, by keyword, how much more it refuses: implicit timestamps, merge keys
(``<<``), long integers, explicit tags for non-plain data, and nesting depth
(checked on the event stream before composing, which recurses). The file
formats keep their own error messages; :func:`describe` turns a PyYAML error
into the one-line ``line N: invalid YAML: PROBLEM`` both use.

:class:`Reader` then reads the parsed values: mappings with their allowed
keys, required keys, strings, lists, booleans and durations, every refusal an
:class:`Invalid` naming the key path (``spec.spiffe.id``, ``policies[0].name``)
in one wording (``want a mapping, got list``; ``unknown field 'x' (want one of
a, b)``). Each file format adds its own rules on top and puts its source in
front. PyYAML is imported only by the loader half, so a format can use the
Reader without loading it.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from sds._util.duration import parse_duration
from sds._util.text import has_control, show

if TYPE_CHECKING:
    import yaml

__all__ = ["Invalid", "Reader", "check_depth", "describe", "join", "strict_loader", "type_name"]

_TIMESTAMP = "tag:yaml.org,2002:timestamp"
# Explicit tags of non-plain data, refused where ``refuse_tags`` is set.
_REFUSED_TAGS = ("timestamp", "binary", "set", "omap", "pairs")


def _error(message: str, mark: Any) -> yaml.constructor.ConstructorError:
    import yaml  # noqa: PLC0415 - PyYAML only with the loader

    return yaml.constructor.ConstructorError(None, None, message, mark)


def _construct_mapping(loader: Any, node: yaml.MappingNode) -> dict[Any, Any]:
    """A mapping whose keys are plain values, each at most once (merged keys included)."""
    if loader.merge_keys:
        loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:
            raise _error("a key must be a plain value", key_node.start_mark) from None
        if duplicate:
            raise _error(f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    mapping: dict[Any, Any] = loader.construct_mapping(node, deep=True)
    return mapping


def _construct_int(loader: Any, node: yaml.ScalarNode) -> int:
    limit = loader.max_int_digits
    if sum(c.isalnum() for c in str(node.value)) > limit:
        raise _error(f"integer with more than {limit} digits", node.start_mark)
    value: int = loader.construct_yaml_int(node)
    return value


def _refuse_tag(loader: Any, node: yaml.Node) -> None:
    raise _error(f"tag {node.tag} is not allowed in this file", node.start_mark)


def strict_loader(
    *,
    fast: bool,
    timestamps: bool,
    merge_keys: bool,
    refuse_tags: bool,
    max_int_digits: int | None = None,
    max_depth: int | None = None,
) -> type[Any]:
    """A safe loader class refusing duplicate and non-plain keys, tuned by keyword.

    ``fast``: libyaml's parser when PyYAML has it (~10x faster on hostile input;
    its error wording differs from the pure-Python parser's). ``timestamps``:
    unquoted dates become datetimes (otherwise they stay strings).
    ``merge_keys``: ``<<`` merges are applied (otherwise refused by PyYAML).
    ``refuse_tags``: explicit ``!!timestamp``, ``!!binary``, ``!!set``,
    ``!!omap`` and ``!!pairs`` are errors. ``max_int_digits``: longer integers
    are errors. ``max_depth``: enforced by :func:`check_depth`.
    """
    import yaml  # noqa: PLC0415 - PyYAML only with the loader

    base: Any = (
        yaml.CSafeLoader if fast and getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader
    )
    namespace: dict[str, Any] = {
        "merge_keys": merge_keys,
        "max_int_digits": max_int_digits,
        "max_depth": max_depth,
        "__doc__": "A safe loader built by sds._util.strictyaml.strict_loader.",
    }
    loader: Any = type("StrictLoader", (base,), namespace)
    if not timestamps:
        loader.yaml_implicit_resolvers = {
            first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
        }
    loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
    if max_int_digits is not None:
        loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
    if refuse_tags:
        for tag in _REFUSED_TAGS:
            loader.add_constructor(f"tag:yaml.org,2002:{tag}", _refuse_tag)
    return loader  # type: ignore[no-any-return]


def check_depth(text: str, loader: type[Any]) -> None:
    """Refuse nesting deeper than ``loader.max_depth`` before composing (composing recurses)."""
    limit = loader.max_depth
    if limit is None:
        return
    import yaml  # noqa: PLC0415 - PyYAML only with the loader

    depth = 0
    starts = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
    ends = (yaml.MappingEndEvent, yaml.SequenceEndEvent)
    for item in yaml.parse(text, Loader=loader):
        if isinstance(item, starts):
            depth += 1
            if depth > limit:
                raise _error(f"nested deeper than {limit} levels", item.start_mark)
        elif isinstance(item, ends):
            depth -= 1


def describe(exc: yaml.YAMLError) -> str:
    """One line: ``line N: invalid YAML: PROBLEM`` (no line when PyYAML gives no mark)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1}: " if mark is not None else ""
    problem = (
        getattr(exc, "problem", None)
        or getattr(exc, "context", None)
        or (str(exc).splitlines() or ["cannot parse"])[0]
    )
    return f"{where}invalid YAML: {problem}"


# --------------------------------------------------------------------------- reading values


class Invalid(ValueError):
    """A value at ``path`` is refused; ``str()`` is ``path: message`` (the format adds a source)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


def join(path: str, key: str | int) -> str:
    """The path of ``key`` inside ``path``: ``a.b`` for a field, ``a[0]`` for a list item."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def type_name(value: object) -> str:
    """The YAML name of ``value``'s type, for ``want X, got Y`` messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


class Reader:
    """Typed reading of parsed YAML values; every refusal raises :class:`Invalid`.

    ``nulls_absent``: a field whose value is null counts as not given (Teleport's
    files write ``labels:`` for none). ``refuse_control``: strings holding a C0
    control character or DEL are refused.
    """

    def __init__(self, *, nulls_absent: bool = False, refuse_control: bool = False) -> None:
        self.nulls_absent = nulls_absent
        self.refuse_control = refuse_control

    def mapping(self, value: object, path: str, allowed: Collection[str]) -> dict[str, Any]:
        """``value`` as a mapping whose keys are strings among ``allowed``."""
        if not isinstance(value, dict):
            raise Invalid(path, f"want a mapping, got {type_name(value)}")
        for key in value:
            if not isinstance(key, str):
                raise Invalid(path, f"field names must be strings, got {key!r}")
            if key not in allowed:
                raise Invalid(
                    path, f"unknown field {key!r} (want one of {', '.join(sorted(allowed))})"
                )
        return {k: v for k, v in value.items() if not (self.nulls_absent and v is None)}

    def required(self, mapping: Mapping[str, Any], key: str, path: str) -> Any:
        """``mapping[key]``; refused as ``path.key: required`` when absent."""
        if key not in mapping:
            raise Invalid(join(path, key), "required")
        return mapping[key]

    def string(self, value: object, path: str, *, nonempty: bool = False) -> str:
        """``value`` as a string (``nonempty``: not ``""``)."""
        if not isinstance(value, str):
            raise Invalid(path, f"want a string, got {type_name(value)}")
        if nonempty and not value:
            raise Invalid(path, "must not be empty")
        if self.refuse_control and has_control(value):
            raise Invalid(path, f"{show(value)}: must not contain control characters")
        return value

    def list(self, value: object, path: str) -> list[Any]:
        """``value`` as a list."""
        if not isinstance(value, list):
            raise Invalid(path, f"want a list, got {type_name(value)}")
        return value

    def boolean(self, value: object, path: str) -> bool:
        """``value`` as ``true`` or ``false``."""
        if not isinstance(value, bool):
            raise Invalid(path, f"want true or false, got {type_name(value)}")
        return value

    def duration(
        self,
        value: object,
        path: str,
        *,
        maximum: dt.timedelta,
        minimum: dt.timedelta | None = None,
        numbers: bool = False,
    ) -> dt.timedelta:
        """A Go-style duration string (``30s``, ``1h30m``), or with ``numbers`` a number of
        seconds; positive, at most ``maximum`` and at least ``minimum``."""
        if numbers and isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
            if math.isfinite(seconds) and seconds > maximum.total_seconds():
                seconds = math.inf  # refused below with the string form's message
            text = show(value)
            if seconds <= 0:
                raise Invalid(path, f"duration {text} must be positive")
            if not math.isfinite(seconds):
                hours = int(maximum.total_seconds()) // 3600
                raise Invalid(path, f"duration {text} is longer than {hours}h")
            duration = dt.timedelta(seconds=seconds)
        elif isinstance(value, str):
            try:
                duration = parse_duration(value, maximum)
            except ValueError as exc:
                raise Invalid(path, str(exc)) from None
        else:
            want = (
                "a duration like 30s, 5m or 1h30m, or seconds"
                if numbers
                else "a duration string like 30s, 5m or 1h30m"
            )
            raise Invalid(path, f"want {want}, got {type_name(value)}")
        if minimum is not None and duration < minimum:
            raise Invalid(path, f"must be at least {int(minimum.total_seconds())}s")
        return duration
