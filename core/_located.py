"""YAML with the line and column of every node, and pydantic errors reported there: what
the edge's ``pipeline.yaml`` and the receiver's alert rules file are loaded with."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from ._errors import ConfigError

__all__ = ["load_yaml_located", "locate_validation_error"]

_Loc = tuple[Any, ...]


def load_yaml_located(text: str, path: str) -> tuple[Any, dict[_Loc, tuple[int, int]]]:
    """Parse YAML; return the data and a map from key path to (line, col), 1-based."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise _yaml_error(e, path) from None
    locs: dict[_Loc, tuple[int, int]] = {}
    if root is None:
        return None, locs
    constructor = yaml.SafeLoader("")

    def walk(node: yaml.Node, at: _Loc) -> Any:
        locs[at] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            constructor.flatten_mapping(node)
            out: dict[Any, Any] = {}
            for knode, vnode in node.value:
                key = constructor.construct_object(knode, deep=True)
                if key in out:
                    raise ConfigError(
                        f"duplicate key {key!r}",
                        path=path,
                        line=knode.start_mark.line + 1,
                        col=knode.start_mark.column + 1,
                    )
                # the key's own position, for "extra key" errors
                locs[(*at, key, "__key__")] = (
                    knode.start_mark.line + 1,
                    knode.start_mark.column + 1,
                )
                out[key] = walk(vnode, (*at, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [walk(item, (*at, i)) for i, item in enumerate(node.value)]
        try:
            return constructor.construct_object(node, deep=True)
        except ValueError as e:  # e.g. an integer beyond Python's 4300-digit limit
            raise ConfigError(
                f"invalid value: {str(e).split(';')[0]}",
                path=path,
                line=node.start_mark.line + 1,
                col=node.start_mark.column + 1,
            ) from None

    try:
        return walk(root, ()), locs
    except yaml.YAMLError as e:
        raise _yaml_error(e, path) from None


def _yaml_error(e: yaml.YAMLError, path: str) -> ConfigError:
    """A YAML syntax or construction error, located at its problem mark."""
    mark = getattr(e, "problem_mark", None)
    return ConfigError(
        f"invalid YAML: {getattr(e, 'problem', None) or e}",
        path=path,
        line=mark.line + 1 if mark else None,
        col=mark.column + 1 if mark else None,
    )


def _clean_loc(loc: _Loc) -> _Loc:
    # pydantic puts union/validator tags ("function-after[...]", "str") into locations
    return tuple(p for p in loc if isinstance(p, int) or not str(p).endswith("]"))


def _in_document(loc: _Loc, locs: dict[_Loc, tuple[int, int]]) -> _Loc:
    """``loc`` without the parts that name no node of the document: a discriminated
    union's tag (``rules.0.silent.for_min`` is ``rules.0.for_min`` in the YAML)."""
    if loc in locs or (*loc, "__key__") in locs:
        return loc
    kept: _Loc = ()
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if (*kept, part) in locs or (*kept, part, "__key__") in locs or last:
            kept = (*kept, part)
    return kept


def locate_validation_error(
    err: ValidationError, locs: dict[_Loc, tuple[int, int]], path: str
) -> ConfigError:
    """The first pydantic error, as a ConfigError at the closest YAML node."""
    messages = []
    for e in err.errors(include_url=False):
        shown = _clean_loc(tuple(e["loc"]))
        dotted = ".".join(str(p) for p in shown) or "(top level)"
        loc = _in_document(shown, locs)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown key {loc[-1]!r}"
            pos = locs.get((*loc, "__key__"))
        elif e["type"] == "missing":
            msg = f"missing required key {loc[-1]!r}"
            pos = None
        else:
            pos = None
        probe = loc
        while pos is None and probe:
            pos = locs.get(probe)
            probe = probe[:-1]
        pos = pos or locs.get(()) or (1, 1)
        messages.append((pos, f"{dotted}: {msg}"))
    # one error: the usual file:line:col form; several: in file order, one per line
    messages.sort(key=lambda m: m[0])
    (line, col), text = messages[0]
    if len(messages) > 1:
        text += "".join(f"\n{path}:{ln}:{cl}: {m}" for (ln, cl), m in messages[1:])
    return ConfigError(text, path=path, line=line, col=col)
