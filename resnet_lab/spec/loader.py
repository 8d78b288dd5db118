"""YAML in, Python values plus the line of every key out (the errors themselves: spec/errors.py).

PyYAML follows YAML 1.1: unquoted `1e-3` is a string, `on`/`yes` are True and `010` is 8. Our loader follows the
YAML 1.2 core schema instead: `1e-3` is a float, only `true`/`false` are booleans and integers are decimal, so users
write what they mean and `skip: yes` is an error, not a surprise.

Security: a spec is data. It is read with a subclass of `yaml.SafeLoader`, which never imports or calls Python
objects, and any tag outside the core schema (`!!python/object/apply:...`) is an error naming the tag and its line.
Aliases, nesting, list lengths and numbers are bounded, so a hostile file fails in milliseconds instead of eating
memory; and the file itself is checked before a byte is read (a regular file, at most MAX_SPEC_BYTES), so a FIFO or
`/dev/zero` given as a spec is refused instead of hanging the loader or reading forever.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from resnet_lab.spec.errors import SpecError, SpecIssue, format_path

# A real spec is 1-3 KB. PyYAML's pure-Python parser reads about 80 KB/s on a busy CI core, so 64 KiB keeps even
# the largest accepted file under a second, and anything bigger is not a spec (a log, a dataset, a binary).
MAX_SPEC_BYTES = 64 * 1024


class LineDict(dict):
    """A mapping from YAML that remembers the line (1-based) of each key and of itself."""

    line: int = 1
    key_lines: dict[Any, int]


class LineList(list):
    """A sequence from YAML that remembers the line of each item and of itself."""

    line: int = 1
    item_lines: list[int]


# Bounds that keep a hostile or broken file from hanging the loader or eating memory. A real spec has a few dozen
# values, nests 4 levels deep and uses no aliases at all.
MAX_ALIAS_VALUES = 10_000  # values that aliases may add in total ("billion laughs" grows 9^n from n lines)
MAX_DEPTH = 50  # nesting levels; PyYAML's composer recurses, so 10k '[' would otherwise be a RecursionError
MAX_INT = 2**63 - 1  # every integer field (seeds, epochs, sizes) fits in 64 bits; 400 digits is a typo or an attack
# Items of one list or keys of one mapping: the longest list any field takes is a choice's 1,000 values (seeds: 100).
# Checked while composing, so `seeds: [0, 1, ..., 99999]` stops at item 1,001 instead of parsing all of it.
MAX_ITEMS = 1_000
# Characters YAML does not allow in a stream (PyYAML's Reader.NON_PRINTABLE): C0 controls but tab, LF and CR; DEL;
# C1 controls but NEL; surrogates; U+FFFE/U+FFFF. PyYAML reports them as "position 22" with no line; we say where.
_NON_PRINTABLE = re.compile("[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_LINE_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")  # what PyYAML counts as a new line
_CONTROL_NAMES = {0x00: "NUL", 0x08: "backspace", 0x0B: "vertical tab", 0x0C: "form feed", 0x1B: "ESC", 0x7F: "DEL"}

_CORE = "tag:yaml.org,2002:"


class _SpecYAMLError(yaml.MarkedYAMLError):
    """A rule of ours (not PyYAML's syntax) broken at a place in the file; `path` is the field it happened under."""

    def __init__(self, message: str, mark: yaml.Mark | None, path: Sequence[Any]) -> None:
        super().__init__(problem=message, problem_mark=mark)
        self.spec_path = format_path(path)


class _Loader(yaml.SafeLoader):
    """SafeLoader (no object construction) with YAML-1.2-like scalars, line tracking, bounds and duplicate-key errors.

    `yaml.SafeLoader` never imports or calls Python objects; on top of that every tag outside YAML's core schema
    (`!!python/...`, `!!binary`, `!!timestamp`, local `!tags`) is an error that names the tag.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._keys: list[Any] = []  # where the composer / constructor is, as a field path
        self._depth = 0
        self._alias_values = 0
        self._sizes: dict[int, int] = {}

    def fail(self, message: str, mark: yaml.Mark | None) -> _SpecYAMLError:
        """An error at `mark`, under the field being read now."""
        return _SpecYAMLError(message, mark, self._keys)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        # index is the key node of a mapping value, the position of a sequence item, None for keys and the root.
        label = index.value if isinstance(index, yaml.ScalarNode) else index
        if label is not None:
            self._keys.append(label)
        self._depth += 1
        try:
            self._check_length(parent, index)
            if self._depth > MAX_DEPTH:
                raise _SpecYAMLError(f"nested more than {MAX_DEPTH} levels deep; a spec needs 4",
                                     self.peek_event().start_mark, self._keys[:2])  # the whole path is unreadable
            if not self.check_event(yaml.AliasEvent):
                return super().compose_node(parent, index)
            event = self.peek_event()
            mark = event.start_mark
            if event.anchor not in self.anchors:
                raise self.fail(f"alias *{event.anchor} refers to no anchor &{event.anchor} above it", mark)
            node = super().compose_node(parent, index)
            self._alias_values += _expanded_size(node, self._sizes)
            if self._alias_values > MAX_ALIAS_VALUES:
                raise self.fail(f"aliases expand to more than {MAX_ALIAS_VALUES:,} values (an alias bomb?); "
                                "write the values out instead", mark)
            return node
        finally:
            self._depth -= 1
            if label is not None:
                self._keys.pop()

    def _check_length(self, parent: yaml.Node | None, index: Any) -> None:
        """Refuse the item after the MAX_ITEMS-th of a list (or the key after the MAX_ITEMS-th of a mapping)."""
        if isinstance(parent, yaml.SequenceNode) and isinstance(index, int) and index >= MAX_ITEMS:
            what = "items"
        elif isinstance(parent, yaml.MappingNode) and index is None and len(parent.value) >= MAX_ITEMS:
            what = "keys"
        else:
            return
        path = self._keys[:-1] if isinstance(index, int) else self._keys
        raise _SpecYAMLError(f"has more than {MAX_ITEMS:,} {what}; no field takes that many (seeds: at most 100, "
                             f"a choice: at most 1,000 values)", parent.start_mark, path)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values a node stands for once every alias in it is expanded (memoised: aliases share nodes)."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = 1  # provisional: an alias to an enclosing node (a cycle) counts once; construction rejects it
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    else:
        size = 1
    sizes[id(node)] = size
    return size


# YAML 1.2 core schema scalars instead of PyYAML's YAML 1.1 ones: only true/false are booleans (not yes/no/on/off),
# integers are decimal (`010` is not octal 8, `1:30` is not 90), `1e-3` is a float, and dates and `=` stay strings.
_Loader.yaml_implicit_resolvers = {}
_Loader.add_implicit_resolver(_CORE + "null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""])
_Loader.add_implicit_resolver(_CORE + "merge", re.compile(r"^<<$"), ["<"])
_Loader.add_implicit_resolver(_CORE + "bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_CORE + "int", re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _CORE + "float",
    re.compile(r"^[-+]?(?:(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+)$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _scalar(loader: _Loader, node: yaml.Node, kind: str) -> str:
    if not isinstance(node, yaml.ScalarNode):
        raise loader.fail(f"expected a single {kind} value, not a {_node_kind(node)}", node.start_mark)
    return str(loader.construct_scalar(node))


def _node_kind(node: yaml.Node) -> str:
    return {yaml.MappingNode: "mapping", yaml.SequenceNode: "list"}.get(type(node), "value")


def _construct_int(loader: _Loader, node: yaml.Node) -> int:
    text = _scalar(loader, node, "integer").replace("_", "")
    digits = len(text.lstrip("+-"))
    if digits > 19:  # before int(): Python refuses to convert > 4300 digits, and shows them all in the error
        raise loader.fail(f"{text[:8]}...{text[-4:]} ({digits} digits) is too large for any field", node.start_mark)
    try:
        value = int(text, 10)
    except ValueError:
        raise loader.fail(f"'{text}' is not an integer", node.start_mark) from None
    if abs(value) > MAX_INT:
        raise loader.fail(f"{value} is too large for any field (integers fit in 64 bits)", node.start_mark)
    return value


def _construct_float(loader: _Loader, node: yaml.Node) -> float:
    text = _scalar(loader, node, "number")
    lowered = text.replace("_", "").lower()
    if lowered in (".nan", "nan"):
        raise loader.fail(f"'{text}' (not a number) is not a usable value", node.start_mark)
    if lowered.lstrip("+-") in (".inf", "inf"):
        return float(lowered.replace(".", ""))
    try:
        value = float(lowered)
    except ValueError:
        raise loader.fail(f"'{text}' is not a number", node.start_mark) from None
    if math.isinf(value):
        raise loader.fail(f"{text} is too large for a float (it would be infinity)", node.start_mark)
    return value


def _construct_bool(loader: _Loader, node: yaml.Node) -> bool:
    text = _scalar(loader, node, "boolean")
    if text.lower() not in ("true", "false"):
        raise loader.fail(f"'{text}' is not a boolean; write true or false", node.start_mark)
    return text.lower() == "true"


_Pair = tuple[yaml.Node, yaml.Node, bool]  # key node, value node, written in this mapping (not merged in)


def _merged_pairs(loader: _Loader, node: yaml.MappingNode, inside: tuple[int, ...] = ()) -> list[_Pair]:
    """The mapping's (key, value, written here) pairs, lowest precedence first, `<<` merge keys resolved.

    YAML's merge key (yaml.org/type/merge.html): the pairs of `<<: *base` are inserted, keys written in the mapping
    itself override them, and in `<<: [*a, *b]` a key of `a` overrides the same key of `b`. So an override after a
    merge is the point of the feature, not a duplicate; the same key written twice in one mapping still is.
    PyYAML's own `flatten_mapping` is not used: it rewrites the anchored node in place, after which a later alias
    to it can no longer tell its own keys from the merged ones.
    """
    if id(node) in inside:
        raise loader.fail("a `<<` merge refers to the mapping that contains it; a spec cannot be recursive",
                          node.start_mark)
    inherited: list[_Pair] = []
    own: list[_Pair] = []
    for key_node, value_node in node.value:
        if key_node.tag != _CORE + "merge":
            own.append((key_node, value_node, True))
            continue
        sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        for source in reversed(sources):  # the first source wins: it is applied last
            if not isinstance(source, yaml.MappingNode):
                raise loader.fail(f"`<<` merges a mapping (`<<: *base`) or a list of mappings, not a "
                                  f"{_node_kind(source)}", key_node.start_mark)
            inherited += [(k, v, False) for k, v, _ in _merged_pairs(loader, source, (*inside, id(node)))]
    return inherited + own


def _construct_mapping(loader: _Loader, node: yaml.Node) -> LineDict:
    if not isinstance(node, yaml.MappingNode):
        raise loader.fail(f"expected a mapping, not a {_node_kind(node)}", node.start_mark)
    out = LineDict()
    out.line, out.key_lines = node.start_mark.line + 1, {}
    written: set[Any] = set()  # keys written in this mapping (a merged key may be overridden; these may not)
    for key_node, value_node, own in _merged_pairs(loader, node):
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str | int | float | bool):
            shown = "empty" if key is None else f"a {_node_kind(key_node)}"
            raise loader.fail(f"keys must be plain names (got {shown} key)", key_node.start_mark)
        if own and key in written:
            raise loader.fail(f"invalid YAML: duplicate key '{key}' (first on line {out.key_lines[key]})",
                              key_node.start_mark)
        if own:
            written.add(key)
        loader._keys.append(key)
        try:
            out[key] = loader.construct_object(value_node, deep=True)
        except yaml.MarkedYAMLError as exc:  # PyYAML's own construction errors: say under which field
            if not hasattr(exc, "spec_path"):
                exc.spec_path = format_path(loader._keys)  # type: ignore[attr-defined]
            raise
        finally:
            loader._keys.pop()
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _Loader, node: yaml.Node) -> LineList:
    if not isinstance(node, yaml.SequenceNode):
        raise loader.fail(f"expected a list, not a {_node_kind(node)}", node.start_mark)
    out = LineList()
    for i, child in enumerate(node.value):
        loader._keys.append(i)
        try:
            out.append(loader.construct_object(child, deep=True))
        finally:
            loader._keys.pop()
    out.line, out.item_lines = node.start_mark.line + 1, [child.start_mark.line + 1 for child in node.value]
    return out


def _construct_other_tag(loader: _Loader, node: yaml.Node) -> Any:
    tag = node.tag.replace(_CORE, "!!")
    raise loader.fail(f"tag '{tag}' is not allowed: a spec holds plain values (text, numbers, true/false, lists, "
                      "mappings) and is never run as code", node.start_mark)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
_Loader.add_constructor(_CORE + "int", _construct_int)
_Loader.add_constructor(_CORE + "float", _construct_float)
_Loader.add_constructor(_CORE + "bool", _construct_bool)
for _tag in ("binary", "omap", "pairs", "set", "timestamp"):  # safe, but not values any spec field takes
    _Loader.add_constructor(_CORE + _tag, _construct_other_tag)
_Loader.add_constructor(None, _construct_other_tag)  # every other tag: !!python/..., !local


def control_characters(text: str, limit: int = 5) -> list[SpecIssue]:
    """Characters YAML does not allow (NUL, ESC, DEL, ...), each with its line and column; at most `limit`."""
    issues: list[SpecIssue] = []
    for found in _NON_PRINTABLE.finditer(text):
        if len(issues) == limit:
            issues.append(SpecIssue(issues[-1].line, "", "more control characters follow; only the first "
                                                         f"{limit} are listed"))
            break
        breaks = list(_LINE_BREAK.finditer(text, 0, found.start()))
        line = len(breaks) + 1
        column = found.start() - (breaks[-1].end() if breaks else 0) + 1
        code = ord(found.group())
        name = (f"control character {_CONTROL_NAMES[code]}" if code in _CONTROL_NAMES
                else "control character" if code < 0xA0 else "character")
        hint = (" (a binary file, or one saved as UTF-16? save it as UTF-8 text)" if code == 0
                else "; delete it (a paste from a terminal or a word processor can leave these behind)")
        issues.append(SpecIssue(line, "", f"{name} U+{code:04X} at column {column} is not allowed in a YAML "
                                          f"file{hint}"))
    return issues


def parse_yaml_text(text: str, source: str) -> Any:
    """Parse YAML text with our scalar rules and bounds; raises SpecError with the line on any problem."""
    bad_characters = control_characters(text)
    if bad_characters:
        raise SpecError(source, bad_characters)
    try:
        return yaml.load(text, Loader=_Loader)
    except _SpecYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise SpecError(source, [SpecIssue(line, exc.spec_path, str(exc.problem))]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or str(exc)
        if ("\t" in text and "tab" in problem.lower()) or (mark and "\t" in _line_of(text, mark.line)):
            problem = "tab character: YAML indentation must use spaces"
        elif problem == "but found another document":
            problem = "a spec is one YAML document; remove the `---` line and what follows it"
        elif "recursive" in problem:
            problem = "an alias refers to a mapping or list that contains it; a spec cannot be recursive"
        elif exc.context and exc.context_mark and mark and exc.context_mark.line != mark.line:
            problem += f" ({exc.context} started on line {exc.context_mark.line + 1})"
        issue = SpecIssue(mark.line + 1 if mark else None, getattr(exc, "spec_path", ""), f"invalid YAML: {problem}")
        raise SpecError(source, [issue]) from None
    except yaml.YAMLError as exc:
        raise SpecError(source, [SpecIssue(None, "", f"invalid YAML: {exc}")]) from None


def _line_of(text: str, index: int) -> str:
    lines = text.splitlines()
    return lines[index] if 0 <= index < len(lines) else ""


_FILE_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def read_spec_bytes(path: str | Path) -> bytes:
    """The bytes of a spec file, refused before reading unless it is a regular file of at most MAX_SPEC_BYTES.

    Opened with O_NONBLOCK, so a FIFO without a writer does not block the open; fstat() on the open descriptor (no
    race with a file swapped in between) decides; the read is bounded whatever the size claimed (a file growing
    while read, /proc files that claim 0 bytes).
    """
    source = str(path)

    def refuse(message: str) -> SpecError:
        return SpecError(source, [SpecIssue(None, "", message)])

    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise refuse("no such file") from None
    except PermissionError:
        raise refuse("permission denied: this user cannot read the file (check its owner and mode, "
                     "e.g. `ls -l` and `chmod u+r`)") from None
    except ValueError:  # a NUL character in the path
        raise refuse("is not a usable file path (it contains a NUL character)") from None
    except OSError as exc:
        raise refuse(f"cannot open the file: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise refuse("is a directory; expected a YAML spec file")
        if not stat.S_ISREG(info.st_mode):
            kind = _FILE_KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
            raise refuse(f"is {kind}, not a regular file; a spec must be a regular YAML file (it is not read)")
        if info.st_size > MAX_SPEC_BYTES:
            raise refuse(f"file is {info.st_size:,} bytes; a spec is at most {MAX_SPEC_BYTES:,} (it is not read)")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_SPEC_BYTES:
            chunk = os.read(fd, MAX_SPEC_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise refuse(f"cannot read the file: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > MAX_SPEC_BYTES:
        raise refuse(f"file is more than {MAX_SPEC_BYTES:,} bytes; a spec is at most {MAX_SPEC_BYTES:,}")
    return b"".join(chunks)


def read_spec_file(path: str | Path) -> tuple[LineDict, str]:
    """Read and parse a spec file; every problem (missing, not a file, size, bytes, syntax, shape) is a SpecError."""
    source = str(path)
    raw = read_spec_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SpecError(source, [SpecIssue(line, "", f"not valid UTF-8 (byte 0x{raw[exc.start]:02x}); "
                                                     "save the file as UTF-8")]) from None
    data = parse_yaml_text(text, source)
    if data is None:
        raise SpecError(source, [SpecIssue(1, "", "the spec is empty; expected a mapping with at least `name`")])
    if not isinstance(data, dict):
        line = getattr(data, "line", None) or _first_content_line(text)
        raise SpecError(source, [SpecIssue(line, "", f"expected a mapping of sections at the top level "
                                                     f"(got {type(data).__name__})")])
    return data, source


def _first_content_line(text: str) -> int:
    """The first line that is neither blank nor a comment (where a top-level scalar sits)."""
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            return number
    return 1


def line_of(data: Any, path: Iterable[Any]) -> int | None:
    """The line of the deepest key of `path` found in parsed YAML (None when not from a file)."""
    line, node = getattr(data, "line", None), data
    for part in path:
        if isinstance(node, LineDict) and part in node:
            line, node = node.key_lines.get(part, line), node[part]
        elif isinstance(node, LineList) and isinstance(part, int) and 0 <= part < len(node):
            line, node = node.item_lines[part], node[part]
        else:
            break
    return line


