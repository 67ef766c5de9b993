"""A filter's configuration declaration: what its ``config:`` may hold.

A module declares the configuration it accepts in a custom section named
``edgepipe.config`` (written by the SDKs, see filters/ABI.md "Config declaration"): UTF-8
JSON lines, a header line ``{"edgepipe.config": 1}`` followed by one object per key::

    {"name": "window_s", "type": "number", "default": 60, "exclusive_minimum": 0,
     "description": "window length in seconds"}

``name`` is a config key as the module sees it (ABI v1 config text: nested YAML mappings
flattened with dots); a name ending in ``.*`` stands for one key per suffix, e.g.
``range.*`` for ``range: {T: [-40, 60]}``.  Types: ``bool``, ``int``, ``number``,
``string``, ``number_list``, ``string_list`` (a YAML list or a comma-separated string).
Optional: ``default`` (null or "" for none), ``minimum`` / ``maximum`` / ``exclusive_minimum`` /
``exclusive_maximum`` (of a number or of every list element), ``enum`` (strings: a
list or one string ``"a|b|c"``),
``min_items`` / ``max_items`` (lists), ``nullable`` (an empty value is allowed),
``description``.

:func:`read_declaration` reads it from a module's bytes (wasmtime-py does not expose
custom sections, so the section headers are walked here, bounded); :meth:`Declaration.check`
checks a stage's ``config:`` mapping and returns every problem with the YAML path it
belongs to.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_KEYS",
    "MAX_SECTION_BYTES",
    "SECTION",
    "ConfigKey",
    "ConfigProblem",
    "Declaration",
    "DeclarationError",
    "custom_sections",
    "read_declaration",
]

SECTION = "edgepipe.config"
FORMAT_VERSION = 1
MAX_SECTION_BYTES = 64 * 1024
MAX_KEYS = 256
MAX_PROBLEMS = 20

TYPES = ("bool", "int", "number", "string", "number_list", "string_list")
_FIELDS = {
    "name",
    "type",
    "default",
    "minimum",
    "maximum",
    "exclusive_minimum",
    "exclusive_maximum",
    "enum",
    "min_items",
    "max_items",
    "nullable",
    "description",
}


class DeclarationError(ValueError):
    """A malformed ``edgepipe.config`` section."""


def _leb(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    for _ in range(5):
        if pos >= len(data):
            raise DeclarationError("truncated module")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
    raise DeclarationError("bad LEB128 length")


def custom_sections(wasm: bytes, name: str) -> list[bytes]:
    """The payloads of every custom section called ``name`` in a binary module."""
    if wasm[:4] != b"\0asm":
        raise DeclarationError("not a WebAssembly binary module")
    out: list[bytes] = []
    pos = 8
    while pos < len(wasm):
        sid = wasm[pos]
        size, start = _leb(wasm, pos + 1)
        end = start + size
        if end > len(wasm):
            raise DeclarationError("truncated section")
        if sid == 0:
            nlen, p = _leb(wasm, start)
            if p + nlen <= end and wasm[p : p + nlen] == name.encode():
                out.append(wasm[p + nlen : end])
        pos = end
    return out


@dataclass(frozen=True)
class ConfigProblem:
    """One problem of a stage's config: ``path`` is the YAML path inside ``config:``;
    ``at_key`` says the key itself (not its value) is wrong."""

    path: tuple[str, ...]
    message: str
    at_key: bool = False

    def __str__(self) -> str:
        return f"config.{'.'.join(self.path)}: {self.message}"


@dataclass(frozen=True)
class ConfigKey:
    name: str
    type: str
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    enum: tuple[str, ...] | None = None
    min_items: int | None = None
    max_items: int | None = None
    nullable: bool = False
    description: str = ""

    @property
    def pattern(self) -> bool:
        return self.name.endswith(".*")

    def matches(self, flat: str) -> bool:
        if self.pattern:
            prefix = self.name[:-1]
            return flat.startswith(prefix) and len(flat) > len(prefix)
        return flat == self.name

    # -- checking one value ------------------------------------------------------
    def check(self, value: Any) -> str | None:
        """Why ``value`` is not acceptable, or None."""
        if value is None or value == "":
            return None if self.nullable else f"needs a value ({self.type_text()})"
        t = self.type
        if t == "bool":
            return None if isinstance(value, bool) else self._wrong(value)
        if t in ("int", "number"):
            if not _is_number(value) or (t == "int" and not isinstance(value, int)):
                return self._wrong(value)
            return self._bounds(value)
        if t == "string":
            if not isinstance(value, str):
                return self._wrong(value)
            return self._choice(value)
        items = value
        if t == "string_list" and isinstance(value, str):
            items = [w.strip() for w in value.split(",")]
        if not isinstance(items, list | tuple):
            return self._wrong(value)
        if self.min_items is not None and len(items) < self.min_items:
            return f"needs at least {self.min_items} item(s), got {len(items)}"
        if self.max_items is not None and len(items) > self.max_items:
            return f"takes at most {self.max_items} item(s), got {len(items)}"
        for i, item in enumerate(items):
            if t == "number_list":
                why = self._wrong(item) if not _is_number(item) else self._bounds(item)
            else:
                why = self._wrong(item) if not isinstance(item, str) else self._choice(item)
            if why:
                return f"item {i + 1}: {why}"
        return None

    def type_text(self) -> str:
        return {
            "bool": "true or false",
            "int": "an integer",
            "number": "a number",
            "string": "a string",
            "number_list": "a list of numbers",
            "string_list": "a list of strings",
        }[self.type]

    def range_text(self) -> str:
        parts = []
        if self.minimum is not None:
            parts.append(f">= {_num(self.minimum)}")
        if self.exclusive_minimum is not None:
            parts.append(f"> {_num(self.exclusive_minimum)}")
        if self.maximum is not None:
            parts.append(f"<= {_num(self.maximum)}")
        if self.exclusive_maximum is not None:
            parts.append(f"< {_num(self.exclusive_maximum)}")
        return " and ".join(parts)

    def _wrong(self, value: Any) -> str:
        return f"expected {self.type_text()}, got {_type_name(value)} {value!r}"

    def _bounds(self, v: float) -> str | None:
        if (
            (self.minimum is not None and v < self.minimum)
            or (self.maximum is not None and v > self.maximum)
            or (self.exclusive_minimum is not None and v <= self.exclusive_minimum)
            or (self.exclusive_maximum is not None and v >= self.exclusive_maximum)
            or (isinstance(v, float) and math.isnan(v))
        ):
            return f"{_num(v)} is out of range (must be {self.range_text()})"
        return None

    def _choice(self, v: str) -> str | None:
        if self.enum is not None and v not in self.enum:
            import difflib  # only on the error path

            hint = difflib.get_close_matches(v, self.enum, n=1)
            also = f" (did you mean {hint[0]!r}?)" if hint else ""
            return f"{v!r} is not one of {', '.join(self.enum)}{also}"
        return None

    # -- presentation ----------------------------------------------------------------
    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema of this key's YAML value (editor completion)."""
        bounds = {
            k: getattr(self, k)
            for k in ("minimum", "maximum", "exclusive_minimum", "exclusive_maximum")
            if getattr(self, k) is not None
        }
        bounds = {
            {"exclusive_minimum": "exclusiveMinimum", "exclusive_maximum": "exclusiveMaximum"}.get(
                k, k
            ): v
            for k, v in bounds.items()
        }
        enum = {"enum": list(self.enum)} if self.enum is not None else {}
        t = self.type
        node: dict[str, Any]
        if t == "bool":
            node = {"type": "boolean"}
        elif t == "int":
            node = {"type": "integer", **bounds}
        elif t == "number":
            node = {"type": "number", **bounds}
        elif t == "string":
            node = {"type": "string", **enum}
        else:
            items = (
                {"type": "number", **bounds} if t == "number_list" else {"type": "string", **enum}
            )
            node = {"type": "array", "items": items}
            if self.min_items is not None:
                node["minItems"] = self.min_items
            if self.max_items is not None:
                node["maxItems"] = self.max_items
            if t == "string_list":
                node = {"anyOf": [node, {"type": "string"}]}
        if self.nullable:
            node = {"anyOf": [node, {"type": "null"}]}
        if self.description:
            node["description"] = self.description
        if self.default is not None:
            node["default"] = self.default
        return node


@dataclass(frozen=True)
class Declaration:
    """The configuration a module accepts (see the module docstring)."""

    keys: tuple[ConfigKey, ...]
    version: int = FORMAT_VERSION
    _exact: dict[str, ConfigKey] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._exact.update({k.name: k for k in self.keys if not k.pattern})

    def find(self, flat: str) -> ConfigKey | None:
        key = self._exact.get(flat)
        if key is not None:
            return key
        for k in self.keys:
            if k.pattern and k.matches(flat):
                return k
        return None

    def check(self, config: Mapping[str, Any]) -> list[ConfigProblem]:
        """Every problem of a stage's ``config:`` (unknown keys, types, ranges)."""
        problems: list[ConfigProblem] = []
        for flat, path, value in _flatten(config):
            key = self.find(flat)
            if key is None:
                problems.append(ConfigProblem(path, self._unknown(flat), at_key=True))
            else:
                why = key.check(value)
                if why:
                    problems.append(ConfigProblem(path, why))
            if len(problems) >= MAX_PROBLEMS:
                break
        return problems

    def _unknown(self, flat: str) -> str:
        names = [k.name for k in self.keys]
        if not names:
            return "unknown key (this filter takes no configuration)"
        if any(k.pattern and k.name[:-2] == flat for k in self.keys):
            return f"unknown key: {flat!r} takes one value per name ({flat}.NAME)"
        candidates = {}
        for k in self.keys:
            if k.pattern:
                prefix = k.name[:-2]
                tail = flat.split(".", 1)[1] if "." in flat else ""
                candidates[f"{prefix}.{tail}" if tail else prefix] = k.name
            else:
                candidates[k.name] = k.name
        import difflib  # only on the error path

        hint = difflib.get_close_matches(flat, list(candidates), n=1, cutoff=0.6)
        also = f"; did you mean {hint[0]!r}?" if hint else ""
        shown = ", ".join(n.replace(".*", ".NAME") for n in names)
        return f"unknown key{also} (this filter takes: {shown})"

    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema of a stage's ``config:`` mapping."""
        props: dict[str, Any] = {}
        patterns: dict[str, Any] = {}
        groups: dict[str, dict[str, Any]] = {}
        for k in self.keys:
            node = k.json_schema()
            if k.pattern:
                prefix = k.name[:-2]
                patterns[f"^{_re_escape(prefix)}\\..+$"] = node
                groups[prefix] = {
                    "type": "object",
                    "additionalProperties": node,
                    "description": k.description or f"one value per name ({prefix}.NAME)",
                }
            else:
                props[k.name] = node
        for prefix, node in groups.items():
            if prefix in props:  # e.g. `band` and `band.*`: a value or a mapping
                props[prefix] = {"anyOf": [props[prefix], node]}
            else:
                props[prefix] = node
        schema: dict[str, Any] = {"type": "object", "properties": props}
        if patterns:
            schema["patternProperties"] = patterns
        schema["additionalProperties"] = False
        return schema

    def to_json(self) -> dict[str, Any]:
        out = []
        for k in self.keys:
            d = {"name": k.name, "type": k.type}
            for f in sorted(_FIELDS - {"name", "type"}):
                v = getattr(k, f)
                if v is not None and v is not False and v != "":
                    d[f] = list(v) if isinstance(v, tuple) else v
            out.append(d)
        return {"edgepipe.config": self.version, "keys": out}


def _flatten(config: Mapping[str, Any]) -> Iterator[tuple[str, tuple[str, ...], Any]]:
    """(flat key, YAML path, value) of every leaf, as the ABI config text flattens it."""

    def walk(prefix: str, path: tuple[str, ...], value: Any) -> Iterator[Any]:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                yield from walk(f"{prefix}.{k}" if prefix else str(k), (*path, str(k)), v)
        else:
            yield prefix, path, value

    for k, v in config.items():
        yield from walk(str(k), (str(k),), v)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _type_name(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(
        type(v), "list" if isinstance(v, list) else "mapping" if isinstance(v, dict) else "value"
    )


def _num(v: float) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() and abs(v) < 1e15 else str(v)


def _re_escape(s: str) -> str:
    import re

    return re.escape(s)


# -- reading ------------------------------------------------------------------------


def _key(obj: Any, line: int) -> ConfigKey:
    where = f"{SECTION} line {line}"
    if not isinstance(obj, dict):
        raise DeclarationError(f"{where}: expected a JSON object")
    extra = set(obj) - _FIELDS
    if extra:
        raise DeclarationError(f"{where}: unknown field(s) {', '.join(sorted(extra))}")
    name, typ = obj.get("name"), obj.get("type")
    if not isinstance(name, str) or not name or len(name) > 128 or "*" in name.rstrip("*"):
        raise DeclarationError(f"{where}: 'name' must be a key (1-128 chars, '.*' suffix only)")
    if name.endswith("*") and not name.endswith(".*"):
        raise DeclarationError(f"{where}: a pattern name ends with '.*'")
    if typ not in TYPES:
        raise DeclarationError(f"{where}: 'type' must be one of {', '.join(TYPES)}")
    for f in ("minimum", "maximum", "exclusive_minimum", "exclusive_maximum"):
        if obj.get(f) is not None and not _is_number(obj[f]):
            raise DeclarationError(f"{where}: {f!r} must be a number")
    for f in ("min_items", "max_items"):
        if obj.get(f) is not None and not (isinstance(obj[f], int) and obj[f] >= 0):
            raise DeclarationError(f"{where}: {f!r} must be a count")
    enum = obj.get("enum")
    if isinstance(enum, str):  # "a|b|c" (what the C SDK writes)
        enum = [e for e in enum.split("|") if e]
    if enum is not None and not (
        isinstance(enum, list) and enum and all(isinstance(e, str) for e in enum)
    ):
        raise DeclarationError(f"{where}: 'enum' must be a list of strings")
    desc = obj.get("description") or ""
    if not isinstance(desc, str):
        raise DeclarationError(f"{where}: 'description' must be a string")
    default = obj.get("default")
    key = ConfigKey(
        name=name,
        type=typ,
        default=None if default == "" else default,
        minimum=obj.get("minimum"),
        maximum=obj.get("maximum"),
        exclusive_minimum=obj.get("exclusive_minimum"),
        exclusive_maximum=obj.get("exclusive_maximum"),
        enum=tuple(enum) if enum is not None else None,
        min_items=obj.get("min_items"),
        max_items=obj.get("max_items"),
        nullable=bool(obj.get("nullable", False)),
        description=desc[:1000],
    )
    if key.default is not None and key.check(key.default) is not None:
        raise DeclarationError(f"{where}: default {key.default!r}: {key.check(key.default)}")
    return key


def parse_declaration(data: bytes) -> Declaration:
    """A declaration from the section's bytes; :class:`DeclarationError` if malformed."""
    if len(data) > MAX_SECTION_BYTES:
        raise DeclarationError(f"{SECTION} is larger than {MAX_SECTION_BYTES} bytes")
    try:
        text = data.rstrip(b"\0").decode()
    except UnicodeDecodeError:
        raise DeclarationError(f"{SECTION} is not UTF-8") from None
    lines = [(i, ln) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    objs = []
    for i, ln in lines:
        try:
            objs.append((i, json.loads(ln)))
        except ValueError as e:
            raise DeclarationError(f"{SECTION} line {i}: not JSON ({e.msg})") from None
    if not objs or not isinstance(objs[0][1], dict) or set(objs[0][1]) != {SECTION}:
        raise DeclarationError(f'{SECTION} must start with the line {{"{SECTION}": 1}}')
    version = objs[0][1][SECTION]
    if version != FORMAT_VERSION:
        raise DeclarationError(
            f"{SECTION} format version {version!r}; this host reads version {FORMAT_VERSION}"
        )
    if len(objs) - 1 > MAX_KEYS:
        raise DeclarationError(f"{SECTION} declares more than {MAX_KEYS} keys")
    keys = [_key(obj, i) for i, obj in objs[1:]]
    names = [k.name for k in keys]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise DeclarationError(f"{SECTION} declares {', '.join(sorted(dup))} twice")
    return Declaration(tuple(keys), version)


def read_declaration(wasm: bytes) -> Declaration | None:
    """The module's declaration, None when it has none; :class:`DeclarationError`."""
    sections = custom_sections(wasm, SECTION)
    if not sections:
        return None
    return parse_declaration(b"".join(sections))
