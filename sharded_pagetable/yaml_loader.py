"""Strict YAML for config files: plain data only, and bounded messages about it.

:func:`load_yaml` refuses anchors, aliases, merge keys, duplicate keys and deep nesting
(naming the key and line), files over ``MAX_FILE_BYTES``, non-UTF-8 text and syntax errors,
each as a :class:`ConfigError` naming the file. :func:`show` and :func:`key_name` put any
value into a message in at most 80 characters.
"""

from __future__ import annotations

import reprlib
from typing import Any

import yaml

from .errors import ConfigError

# The shipped configs are under 2 KB. The pure-Python parser reads a 64 KB flow list or
# 13k-line mapping in 1.2 s on this machine, so this bounds the slowest refusal.
MAX_FILE_BYTES = 1 << 16
MAX_DEPTH = 16  # the shipped configs nest 3 deep
_SHOW_CHARS = 80

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxtuple = 2, 4, 6, 6
_repr.maxstring = _repr.maxother = _repr.maxlong = _SHOW_CHARS


def show(value: Any) -> str:
    """``repr(value)`` in at most 80 characters, without ever expanding a large value.

    A 440-byte YAML alias bomb once took 59 s and 4.8 GB here through a plain ``!r``.
    """
    try:
        text = _repr.repr(value)
    except Exception:  # e.g. an int past Python's 4300-digit str() limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= _SHOW_CHARS else text[: _SHOW_CHARS - 3] + "..."


def key_name(key: Any) -> str:
    """A mapping key as it reads in a message: as is if a short one-line string."""
    if isinstance(key, str) and key.isprintable() and len(key) <= _SHOW_CHARS:
        return key
    return show(key)


class _Refused(yaml.MarkedYAMLError):
    """YAML that is valid but not accepted in a config (aliases, duplicate keys, ...)."""


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors, aliases, merge keys, duplicate keys and
    nesting deeper than ``MAX_DEPTH``, naming the key and line. Without aliases a document
    holds no more values than its text, so nothing downstream can be made to expand."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._path: list[str] = []  # keys from the root to the node being composed

    def _where(self) -> str:
        return "".join(self._path).lstrip(".") or "the document"

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if isinstance(index, yaml.ScalarNode):
            self._path.append("." + key_name(index.value))
        elif isinstance(index, int):
            self._path.append(f"[{index}]")
        else:  # the root, or a mapping key
            self._path.append("")
        try:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or event.anchor is not None:
                kind = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
                raise _Refused(
                    problem=f"{self._where()}: YAML anchors and aliases are not allowed "
                    f"(found {kind}{key_name(event.anchor)})",
                    problem_mark=event.start_mark,
                )
            if len(self._path) > MAX_DEPTH:
                raise _Refused(
                    problem=f"{self._where()}: nested deeper than {MAX_DEPTH} levels",
                    problem_mark=event.start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._path.pop()

    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        first: dict[tuple[str, str], yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _Refused(
                    problem=f"{self._where()}: YAML merge keys (<<) are not allowed",
                    problem_mark=key_node.start_mark,
                )
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # unhashable: the constructor refuses it
            seen = first.setdefault((key_node.tag, key_node.value), key_node)
            if seen is not key_node:
                key = "".join([*self._path, "." + key_name(key_node.value)]).lstrip(".")
                raise _Refused(
                    problem=f"duplicate key {key} (first at line {seen.start_mark.line + 1})",
                    problem_mark=key_node.start_mark,
                )
        return node


def load_yaml(path: str) -> Any:
    """The YAML document in ``path``; every problem with its text is a ``ConfigError`` naming
    the file and line. A missing or unreadable file raises ``OSError`` as ``open`` does."""
    with open(path, "rb") as f:
        raw = f.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"config file {path}, line {line}: not UTF-8 text") from None
    loader = None
    try:
        loader = _ConfigLoader(text)  # the reader refuses control characters here
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        if not isinstance(exc, _Refused):
            problem = f"YAML syntax error: {problem}"
        raise ConfigError(f"config file {path}{where}: {problem[:160]}") from None
    except yaml.reader.ReaderError as exc:  # a control character, e.g. in a binary file
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(
            f"config file {path}, line {line}: not YAML text: {exc.reason} (U+{exc.character:04X})"
        ) from None
    except ValueError as exc:  # an int literal past Python's 4300-digit limit
        raise ConfigError(f"config file {path}: bad value: {str(exc)[:160]}") from None
    finally:
        if loader is not None:
            loader.dispose()
