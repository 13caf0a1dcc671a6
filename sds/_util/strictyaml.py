"""Strict YAML reading, shared by the bridge config and the provider's identities files.

:func:`strict_loader` builds a PyYAML safe loader that refuses duplicate keys
(and keys that are not plain values) in every mapping; each file format then
chooses, by keyword, how much more it refuses: implicit timestamps, merge keys
(``<<``), long integers, explicit tags for non-plain data, and nesting depth
(checked on the event stream before composing, which recurses). The file
formats keep their own error messages; :func:`describe` turns a PyYAML error
into the one-line ``line N: invalid YAML: PROBLEM`` both use.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["check_depth", "describe", "strict_loader"]

_TIMESTAMP = "tag:yaml.org,2002:timestamp"
# Explicit tags of non-plain data, refused where ``refuse_tags`` is set.
_REFUSED_TAGS = ("timestamp", "binary", "set", "omap", "pairs")


def _error(message: str, mark: Any) -> yaml.constructor.ConstructorError:
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
