"""config/README.md's key tables, generated from the config schema's descriptions.

::

    python -m llmpipe.config_docs           # rewrite the tables in config/README.md
    python -m llmpipe.config_docs --check   # exit 1 when they differ from the schema

A table stands between ``<!-- keys: PATH -->`` and ``<!-- end keys -->``; PATH is a dotted key of
the schema (``evaluate``, ``models.*``, ``prompts``). It lists every key under PATH with its type
(choices and range included), default and description, nested sections flattened
(``perplexity.n_ctx``), except sections that have a table of their own. The prose around the
tables is written by hand. Every key must have a description and appear in one table.
"""

from __future__ import annotations

import argparse
import re
import sys

from llmpipe import config as cfg
from llmpipe.paths import REPO_ROOT

README = REPO_ROOT / "config" / "README.md"
TABLE = re.compile(r"(<!-- keys: (?P<path>[\w.*]+) -->\n)(?P<body>.*?)(<!-- end keys -->)", re.S)
_CODE_SPAN = re.compile(r"(`[^`]*`)")


def render(readme: str) -> str:
    """``readme`` with every key table regenerated from the schema."""
    paths = {m["path"] for m in TABLE.finditer(readme)}
    rows_of = {path: _rows(path, paths - {path}) for path in paths}
    missing = _leaves("", cfg.schema(), paths)  # the keys under no table's path
    if missing:
        raise ValueError(
            f"{README}: no table lists {', '.join(missing)} (add a '<!-- keys: PATH -->' table)"
        )
    return TABLE.sub(lambda m: m[1] + _table(rows_of[m["path"]]) + m[4], readme)


def _rows(path: str, own_tables: set[str]) -> list[str]:
    """The rows of the table of ``path``, one per key."""
    node = cfg.key_schema(path)
    if "properties" in node:
        keys = _leaves(path, node, own_tables)
        names = [key.removeprefix(f"{path}.") for key in keys]
    else:  # a table of one key (``prompts``)
        keys, names = [path], [path.rsplit(".", 1)[-1]]
    rows = []
    for key, name in zip(keys, names, strict=True):
        sub = cfg.key_schema(key)
        if not sub.get("description"):
            raise ValueError(f"{cfg.SCHEMA_PATH}: {key} has no description")
        parent = cfg.key_schema(key.rsplit(".", 1)[0]) if "." in key else cfg.schema()
        required = name.rsplit(".", 1)[-1] in parent.get("required", ())
        default = f"`{_yaml(sub['default'])}`" if "default" in sub else ""
        cells = [f"`{name}`", _type(sub), default or ("required" if required else "")]
        cells.append(_markdown(sub["description"]))
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return rows


def _leaves(path: str, node: dict, own_tables: set[str]) -> list[str]:
    """The keys under ``node`` that a table shows: nested sections are walked into, except
    those with a table of their own; a mapping keyed by the user (``models``) counts as one key
    unless a table shows its values (``models.*``)."""
    keys = []
    for name, sub in node.get("properties", {}).items():
        key = f"{path}.{name}" if path else name
        sub = cfg.resolve_ref(sub)
        if key in own_tables or f"{key}.*" in own_tables:
            continue
        keys += _leaves(key, sub, own_tables) if "properties" in sub else [key]
    return keys


def _table(rows: list[str]) -> str:
    head = "| key | type | default | meaning |\n|---|---|---|---|\n"
    return head + "".join(row + "\n" for row in rows)


def _type(node: dict, plural: bool = False) -> str:
    """A key's type in words: ``integer ≥ 1 or null``, ``one of `a`, `b```, ``list of …``."""
    if "enum" in node:
        return ("" if plural else "one of ") + ", ".join(f"`{v}`" for v in node["enum"])
    kinds = node["type"] if isinstance(node["type"], list) else [node["type"]]
    words = []
    for kind in kinds:
        if kind == "array":
            words.append("list of " + _type(node.get("items", {"type": "value"}), plural=True))
        elif kind == "object":
            values = node.get("additionalProperties")
            of = f" of names to {_type(values, plural=True)}" if isinstance(values, dict) else ""
            words.append(("mappings" if plural else "mapping") + of)
        else:
            bounds = _bounds(node) if kind in ("integer", "number") else []
            words.append(" ".join([f"{kind}s" if plural else kind, *bounds]))
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _bounds(node: dict) -> list[str]:
    signs = {"minimum": "≥", "exclusiveMinimum": ">", "maximum": "≤", "exclusiveMaximum": "<"}
    bounds = [f"{sign} {node[word]}" for word, sign in signs.items() if word in node]
    return [", ".join(bounds)] if bounds else []


def _yaml(value: object) -> str:
    """A default as the config file writes it (YAML flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return str(value)


def _markdown(text: str) -> str:
    """A description as table text: '<' (HTML) and '*' (emphasis) escaped outside code spans."""
    parts = _CODE_SPAN.split(" ".join(text.split()))
    escape = str.maketrans({"<": "\\<", "*": "\\*"})
    return "".join(p if p.startswith("`") else p.translate(escape) for p in parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmpipe.config_docs", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report a difference")
    args = parser.parse_args(argv)
    current = README.read_text(encoding="utf-8")
    wanted = render(current)
    if args.check:
        if wanted != current:
            print(f"{README} differs from the schema: run python -m llmpipe.config_docs")
            return 1
        return 0
    README.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
