"""Where in the pipeline file a problem is, and how to say it: each key's line, key paths
(`stages[1].sampling`), pydantic's errors reworded to say what to fix, and the checks of an
input template."""

from __future__ import annotations

import difflib
import re
import string
import types
import typing
from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import BaseModel

from omnistage.settings import ProfilerSettings

KeyPath = tuple[str | int, ...]
StrPath = tuple[str, ...]
LineMap = dict[StrPath, int]
TEMPLATE_FIELDS = ("text", "prompt")  # what a text or chat template may use


def format_key_path(path: Sequence[str | int]) -> str:
    """`("stages", 1, "sampling")` -> `stages[1].sampling`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out or "(top level)"


def map_lines(
    node: yaml.Node, path: StrPath, lines: LineMap, dup: list[StrPath], active: set[int]
) -> None:
    """Record the 1-based line of every key and item in `lines`, and duplicate keys in `dup`."""
    lines.setdefault(path, node.start_mark.line + 1)
    if id(node) in active:  # a recursive alias
        return
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            child = (*path, name)
            if name in seen:
                dup.append(child)
            seen.add(name)
            lines[child] = key.start_mark.line + 1
            map_lines(value, child, lines, dup, active)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            map_lines(item, (*path, str(index)), lines, dup, active)
    active.discard(id(node))


def line_of(path: KeyPath, lines: LineMap) -> int:
    """The line of `path`, or of its nearest parent that has one."""
    keys = tuple(str(p) for p in path)
    for end in range(len(keys), -1, -1):
        if keys[:end] in lines:
            return lines[keys[:end]]
    return 1


def pydantic_message(error: Any, root: type[BaseModel]) -> str:
    """A pydantic error's message, reworded where that says better what to fix."""
    loc = tuple(error["loc"])
    if error["type"] == "extra_forbidden" and loc:
        allowed = allowed_keys(root, loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
        return f"unknown key{did_you_mean} (allowed: {', '.join(allowed)})"
    if error["type"] == "missing":
        return "required key is missing"
    if error["type"] == "model_type":
        return f"expected a mapping of keys, got {type(error['input']).__name__}"
    return re.sub(r"^Value error, ", "", str(error["msg"]))


def allowed_keys(root: type[BaseModel], loc: KeyPath) -> list[str]:
    """The keys of the model found at `loc` below `root` (list items and dict values included)."""
    kind: Any = root
    for part in (*loc, None):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
            kind = args[0]  # X | None -> X
        if part is None:
            break
        if typing.get_origin(kind) in (list, dict):
            kind = typing.get_args(kind)[-1]
        elif isinstance(kind, type) and issubclass(kind, BaseModel):
            field = kind.model_fields.get(str(part))
            kind = ProfilerSettings if part == "profiler_config" else field and field.annotation
        else:
            return []
    return list(kind.model_fields) if isinstance(kind, type) and issubclass(kind, BaseModel) else []


def template_fields(template: str) -> list[str]:
    """The `{field}` names a str.format template uses; ValueError when it is malformed."""
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


def template_problems(template: str) -> list[str]:
    """What is wrong with an input template, if anything."""
    allowed = ", ".join(f"{{{f}}}" for f in TEMPLATE_FIELDS)
    try:
        fields = template_fields(template)
    except ValueError as exc:
        return [f"malformed template ({exc}); write a literal brace as {{{{ or }}}}"]
    return [
        f"unknown template field {{{f}}}; allowed: {allowed}"
        for f in dict.fromkeys(fields)
        if f not in TEMPLATE_FIELDS
    ]
