"""The configuration reference, generated from gateway/config.py (the one source of defaults):
`python -m gateway.configdoc > docs/config.md`. Each key's description is the comment on its
line in config.py; tests check that docs/config.md is up to date."""

from __future__ import annotations

import dataclasses
import io
import json
import tokenize
from pathlib import Path
from typing import Any, get_type_hints

from gateway import config as config_mod

__all__ = ["reference"]

_SOURCE = Path(config_mod.__file__)


def _comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment at the end of that field's line."""
    out: dict[tuple[str, str], str] = {}
    cls = ""
    tokens = tokenize.generate_tokens(io.StringIO(_SOURCE.read_text()).readline)
    line_tokens: list[tokenize.TokenInfo] = []
    for tok in tokens:
        if tok.type in (tokenize.NEWLINE, tokenize.NL):
            words = [t for t in line_tokens if t.type not in (tokenize.INDENT, tokenize.DEDENT)]
            if len(words) >= 2 and words[0].string == "class" and words[0].start[1] == 0:
                cls = words[1].string
            elif (
                len(words) >= 3 and words[0].type == tokenize.NAME and words[1].string == ":" and words[0].start[1] == 4
            ):
                comment = next((t.string for t in words if t.type == tokenize.COMMENT), "")
                out[(cls, words[0].string)] = comment.lstrip("# ").strip()
            line_tokens = []
        else:
            line_tokens.append(tok)
    return out


def _field(tok: tokenize.TokenInfo) -> bool:
    return tok.start[1] == 4  # a dataclass field: a name at the class body's indentation


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return str(value)


def reference() -> str:
    comments = _comments()
    lines = [
        "# Configuration reference",
        "",
        "Generated from `gateway/config.py` by `python -m gateway.configdoc`; do not edit by hand.",
        "Every key has a default, so a config file holds only what it changes (an empty file is valid).",
        "Environment variables override the file: "
        + ", ".join(f"`{var}` ({section}.{key})" for var, (section, key) in config_mod.ENV_OVERRIDES.items())
        + "; `GATEWAY_CONFIG` names the file.",
        "",
    ]
    hints = get_type_hints(config_mod.Config)
    for top in dataclasses.fields(config_mod.Config):
        hint = hints[top.name]
        cls = hint.__args__[0] if top.name == "sources" else hint
        header = f"[[{top.name}]]" if top.name == "sources" else f"[{top.name}]"
        lines += [f"## `{header}`", "", "| key | default | what it does |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            text = comments.get((cls.__name__, f.name), "").replace("|", "\\|")
            lines.append(f"| `{f.name}` | `{_toml(_default(f))}` | {text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference(), end="")
