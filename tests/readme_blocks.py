"""Reading README.md: its ```bash blocks (with the `<!-- marker -->` above each), its tables and
the config keys a table cell names. Used by tests/test_readme.py and tests/test_docs.py."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tests.conftest import ROOT

README = ROOT / "README.md"
CI_BLOCKS = {"ci:demo", "ci:test"}  # set-up blocks that CI runs itself


@dataclass
class Block:
    id: str  # the section's heading as a slug, "-2" for its second block, ...
    marker: str | None  # "ci:demo" from a `<!-- ci:demo -->` line right above the block
    commands: list[str]  # continuation lines joined, comments dropped


def slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


def strip_comment(line: str) -> str:
    """`line` without a trailing `# comment` (a `#` that starts a word outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def bash_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    per_heading: dict[str, int] = {}
    heading, previous, body = "top", "", None
    for line in text.splitlines():
        if body is not None:
            if line.strip() == "```":
                joined = "\n".join(body).replace("\\\n", " ")
                commands = [c for c in map(strip_comment, joined.splitlines()) if c.strip()]
                n = per_heading[heading] = per_heading.get(heading, 0) + 1
                marker = re.fullmatch(r"<!--\s*(\S+)\s*-->", previous.strip())
                block_id = slug(heading) + (f"-{n}" if n > 1 else "")
                blocks.append(Block(block_id, marker and marker.group(1), commands))
                body = None
            else:
                body.append(line)
            continue
        if line.startswith("## "):
            heading = line[3:]
        if line.strip() == "```bash":
            body = []
        elif line.strip():
            previous = line
    return blocks


BLOCKS = bash_blocks(README.read_text())
TO_RUN = [b for b in BLOCKS if b.marker not in CI_BLOCKS]


def table_rows(text: str, header: str) -> list[list[str]]:
    """Cells of the markdown table whose header row starts with `header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def ticked(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def holds_map(group: dict, key: str) -> bool:
    node = group
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return isinstance(node, dict)


def table_keys(cell: str, group: dict) -> list[str]:
    """The dotted keys named in a "what it sets" cell (the rule is in a comment above the table).

    Backticked names are keys of the group; inside the parentheses right after a key that holds
    a map they are keys of that map; inside any other parentheses they are values.
    """
    keys: list[str] = []
    scopes: list[str | None] = [""]  # key prefix per paren depth; None: a value list
    last_key, last_end = None, -1
    for m in re.finditer(r"`([^`]+)`|\(|\)", cell):
        token = m.group(0)
        if token == "(":
            right_after = last_key is not None and not cell[last_end : m.start()].strip()
            scopes.append(f"{last_key}." if right_after and holds_map(group, last_key) else None)
            last_key = None
        elif token == ")":
            scopes.pop()
            last_key = None
        elif scopes[-1] is not None:
            last_key, last_end = scopes[-1] + m.group(1), m.end()
            keys.append(last_key)
    return keys


CONFIG_ROWS = table_rows(README.read_text(), "| group | options |")
