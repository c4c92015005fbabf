"""Strict YAML for config files: plain data only, and bounded messages about it.

:func:`load_yaml` refuses anchors, aliases, merge keys, duplicate keys, deep nesting and
plain values that YAML 1.1 and 1.2 read differently (``040``, ``1_000``, ``yes``, ``1e3``:
see :func:`version_trap`), naming the key and line; and files over ``MAX_FILE_BYTES``,
non-UTF-8 text and syntax errors, each as a :class:`ConfigError` naming the file.
:func:`show` and :func:`key_name` put any value into a message in at most 80 characters.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Callable
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


_TAG = "tag:yaml.org,2002:"
_DECIMAL_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_OCTAL_1_1 = re.compile(r"[-+]?0[0-7_]+")
_BOOLS_1_2 = frozenset(("true", "True", "TRUE", "false", "False", "FALSE"))
# What a YAML 1.2 (core schema) reader takes as a number; PyYAML (YAML 1.1) reads some of
# these as text: 1e3 (no dot), 1.5e3 (no exponent sign), 089, 0o17.
_NUMBER_1_2 = re.compile(
    r"[-+]?(?:[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+|(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?)"
)
_MAX_NUMBER_CHARS = 40  # longer plain text is not taken for a number (nor converted)


def _float_text(value: float) -> str:
    """``value`` written so that YAML 1.1 and 1.2 both read it as that float."""
    if value != value or value in (float("inf"), float("-inf")):
        return {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}[repr(value)]
    text = repr(value)
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    mantissa += "" if "." in mantissa else ".0"
    return f"{mantissa}e{exponent if exponent[0] in '+-' else '+' + exponent}"


def version_trap(node: yaml.ScalarNode, construct: Callable[[yaml.Node], Any]) -> str | None:
    """Why a plain scalar must not be read as PyYAML reads it (``construct(node)``), or None.

    PyYAML implements YAML 1.1, where ``040`` is octal 32, ``0b1010``, ``1_000`` and ``1:30``
    (base 60) are integers and ``yes``/``on``/``off`` booleans, while a YAML 1.2 reader (and
    most people) read ``040`` as 40 and the others as text; ``1e3`` is text in 1.1 and a
    number in 1.2. A config must mean one thing to every reader: integers are plain decimal
    (hex too, though both versions agree on it: no count needs it, and the rule stays one
    line), booleans ``true``/``false``, floats without ``_`` or ``:``.
    """
    text, tag = node.value, node.tag[len(_TAG) :] if node.tag.startswith(_TAG) else ""
    literal = key_name(text)  # as written, if short and printable
    if tag == "int" and not _DECIMAL_INT.fullmatch(text):
        value = show(construct(node))
        if _OCTAL_1_1.fullmatch(text) and "_" not in text:
            decimal = int(text) if len(text) <= _MAX_NUMBER_CHARS else "a decimal"
            return (
                f"{literal} has a leading zero: YAML 1.1 reads it as octal {value}, YAML 1.2 "
                f"as {decimal}; write the number you mean in decimal, without the zero"
            )
        return f"{literal} is not a plain decimal integer (YAML 1.1 reads {value}); write {value}"
    if tag == "float" and ("_" in text or ":" in text):
        value = construct(node)
        return f"{literal} is a number only in YAML 1.1 ({value!r}); write {_float_text(value)}"
    if tag == "bool" and text not in _BOOLS_1_2:
        return (
            f"{literal} is a boolean only in YAML 1.1 ({construct(node)}), text in YAML 1.2; "
            "write true or false (or quote it for text)"
        )
    if tag == "str" and len(text) <= _MAX_NUMBER_CHARS and _NUMBER_1_2.fullmatch(text):
        digits = text.lstrip("+-")
        if digits[:2] in ("0o", "0x"):
            number = str(int(text, 0))
        elif "." in text or "e" in text or "E" in text:
            number = _float_text(float(text))
        else:
            number = str(int(text))
        return (
            f"{literal} is a number in YAML 1.2 but text in YAML 1.1; write {number} for the "
            "number, or quote it for text"
        )
    return None


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
            node = super().compose_node(parent, index)
            if isinstance(node, yaml.ScalarNode) and node.style is None:  # plain, unquoted
                trap = version_trap(node, self.construct_object)
                if trap is not None:
                    raise _Refused(problem=f"{self._where()}: {trap}", problem_mark=node.start_mark)
            return node
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
