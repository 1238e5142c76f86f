"""`data.sources` entries parsed and checked: each source's name, shards, weight and template."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sdtrain.datamodules import batch as B
from sdtrain.datamodules.sources import expand_shards

SOURCE = "__source__"  # a raw sample's source name, set where the mixture draws it
KEYS = ("name", "shards", "weight", "caption_template")
NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a metric key's part: data/drawn/<name>


@dataclass(frozen=True)
class Source:
    """One entry of `data.sources`: its place in the list, name, shards (expanded) and weight."""

    index: int
    name: str
    urls: tuple[str, ...]
    weight: float
    caption_template: str | None = None

    @property
    def where(self) -> str:
        """How messages name it: "data.sources[1] (mine)"."""
        return f"data.sources[{self.index}] ({self.name})"

    @property
    def shards_key(self) -> str:
        """How messages name its shards: "data.sources[1].shards (mine)"."""
        return f"data.sources[{self.index}].shards ({self.name})"


def relabel(error: Exception, where: str) -> Exception:
    """`error` of the same type with "data.train_shards" in its message replaced by `where`."""
    return type(error)(str(error).replace("data.train_shards", where))


def parse_source(index: int, entry: Any, expand: Callable[[Any], list[str]]) -> Source:
    """One `data.sources` entry, checked: a map of a name, shards, a weight > 0 and an optional
    caption template, its shards listed by `expand` (`sources.expand_shards`). ValueError
    (FileNotFoundError for missing shards) naming key and value."""
    at = f"data.sources[{index}]"
    if not isinstance(entry, Mapping):  # a dict, or an OmegaConf DictConfig
        raise ValueError(f"{at}={entry!r} must be a map of name, shards, weight")
    entry = dict(entry)
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise ValueError(f"{at} has unknown key(s) {unknown}: an entry takes {', '.join(KEYS)}")
    name = entry.get("name")
    if name is None or name == "":
        raise ValueError(
            f"{at}.name is missing: each source needs a name (its counters are "
            "data/drawn/<name> and data/skipped/<name>)"
        )
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"{at}.name={name!r} must be letters, digits, '_', '.' or '-'")
    if name in B.SKIP_KINDS:
        raise ValueError(
            f"{at}.name={name!r} is a skip kind (data/skipped/{name} counts those): name the "
            "source otherwise"
        )
    weight = entry.get("weight")
    number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
    if not number or not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"{at}.weight={weight!r} ({name}) must be a number > 0")
    shards = entry.get("shards")
    if isinstance(shards, Sequence) and not isinstance(shards, str):
        shards = list(shards)
    if shards is None or shards == "" or shards == []:
        raise ValueError(f"{at}.shards={shards!r} ({name}) names no shards")
    where = f"{at}.shards ({name})"
    try:
        urls = expand(shards)
    except (ValueError, FileNotFoundError) as e:  # its message names data.train_shards
        raise relabel(e, where) from None
    template = entry.get("caption_template")
    return Source(index, name, tuple(urls), float(weight), template)


def parse_sources(
    sources: Sequence[dict] | None,
    train_shards: Any,
    expand: Callable[[Any], list[str]] = expand_shards,
) -> list[Source] | None:
    """`data.sources` checked, each source's shards listed by `expand` (`sources.expand_shards`
    with the datamodule's settings), or None when it is not set (`data.train_shards` names the
    shards).

    Raises:
        ValueError: both or neither of `data.train_shards` and `data.sources` are set, the list
            is empty, or an entry is bad (`parse_source`), or two entries share a name.
        FileNotFoundError: a source's local shards do not exist.
    """
    if sources is None:
        if train_shards is None:
            raise ValueError(
                "data.train_shards=null and data.sources=null: name the shards to train on in "
                "one of them"
            )
        return None
    if train_shards is not None:
        raise ValueError(
            f"data.train_shards={train_shards!r} and data.sources are both set: a mixture "
            "names its shards in data.sources, each entry's shards (set data.train_shards=null, "
            "as data=mixture does)"
        )
    if isinstance(sources, (str, bytes)) or not isinstance(sources, Sequence) or not sources:
        raise ValueError(
            f"data.sources={sources!r} must be a non-empty list of {{name, shards, weight}} "
            "entries (conf/data/mixture.yaml)"
        )
    parsed: list[Source] = []
    for index, entry in enumerate(sources):
        source = parse_source(index, entry, expand)
        same = [s for s in parsed if s.name == source.name]
        if same:
            raise ValueError(
                f"data.sources[{index}].name={source.name!r} is also data.sources"
                f"[{same[0].index}]'s: each source needs a name of its own"
            )
        parsed.append(source)
    return parsed
