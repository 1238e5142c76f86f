"""Where training data comes from: the shard list that `data.train_shards` names, and the
latent-cache description (cache.json) beside a cache's shards."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sdtrain.datamodules.remote import (
    RemoteSettings,
    check_clients,
    is_remote,
    list_shards,
    read_remote,
    redact,
)

# A latent cache is one folder of shards plus this file, which sdtrain-cache-latents writes last:
# a folder holding it is a complete cache.
CACHE_FILE = "cache.json"
CACHE_FORMAT = "sdtrain-latent-cache"
CACHE_FORMAT_VERSION = 1


def expand_shards(
    urls: str | list[str], allow_pipe: bool = False, remote: RemoteSettings | None = None
) -> list[str]:
    """The shard list that `data.train_shards` names, in order.

    Each entry (one string or a list; "a::b" also separates) is brace-expanded
    ("/data/{00000..00099}.tar"). A local entry may also be a folder (every `*.tar` in it,
    sorted) or a glob ("/data/*.tar", sorted). Remote urls ("https://...", "s3://...", "gs://...")
    are streamed (`datamodules.remote`); an object-store folder ("s3://bucket/prefix/") or glob
    ("s3://bucket/prefix/*.tar") is listed now (with `remote`'s settings), sorted. "pipe:"
    commands (a shell command per shard) only with `allow_pipe`, since a config must not run code
    unless it says so.

    Raises:
        FileNotFoundError: a folder holds no `*.tar`, a glob matches nothing, or local shards do
            not exist (caught here: a stream of unreadable shards would otherwise spin forever).
        ValueError: nothing is named at all, a "pipe:" url without `allow_pipe`, a remote url
            whose client is not installed, or a listing that failed.
    """
    from braceexpand import braceexpand

    remote = remote or RemoteSettings()
    patterns = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    missing: list[str] = []
    for url in (u for p in patterns for part in str(p).split("::") for u in braceexpand(part)):
        if url.startswith("pipe:") and not allow_pipe:
            raise ValueError(
                f"data.train_shards: {url!r} is a shell command (webdataset's pipe: url); "
                "set data.allow_pipe=true (sdtrain-cache-latents: --allow-pipe) to run it"
            )
        if is_remote(url):
            out += list_shards(url, remote)
            continue
        if "://" in url or url.startswith("pipe:"):
            out.append(url)
            continue
        found = local_shards(url)
        # a folder's and a glob's shards are files: only a plain path can be missing
        missing += [] if Path(found[0]).is_file() else [url]
        out += found
    if not out:
        raise ValueError(f"data.train_shards={urls!r} names no shards")
    if missing:
        raise FileNotFoundError(
            f"data.train_shards: {len(missing)} of {len(out)} shard(s) do not exist, e.g. "
            f"{', '.join(missing[:3])}"
        )
    check_clients(out)
    return out


def local_shards(url: str) -> list[str]:
    """The shards a local `data.train_shards` entry names: a folder's `*.tar` or a glob's files
    (sorted, FileNotFoundError when none), else the path itself, existing or not."""
    import glob

    path = Path(url).expanduser()
    if path.is_dir():
        found = sorted(str(p) for p in path.glob("*.tar") if p.is_file())
        if not found:
            raise FileNotFoundError(f"data.train_shards: folder {path} holds no *.tar shards")
    elif glob.has_magic(str(path)):
        found = sorted(p for p in glob.glob(str(path)) if Path(p).is_file())
        if not found:
            raise FileNotFoundError(f"data.train_shards: {path} matches no files")
    elif url.endswith(("/", os.sep)):
        raise FileNotFoundError(f"data.train_shards: folder {url} does not exist")
    else:
        found = [str(path)]
    return found


def read_latent_cache(urls: list[str], remote: RemoteSettings | None = None) -> dict | None:
    """The parsed cache.json of the latent cache that `urls` come from (with "folder" added), or
    None when their folders hold none (image shards). Remote shards of one folder are looked
    for a cache.json beside them too (one small read, with `remote`'s settings).

    Raises:
        ValueError: the shards mix a latent cache with other shards or a second cache (one
            cache.json must describe every shard), or cache.json is unreadable or of another
            format version.
    """
    folders = sorted({parent(u) for u in urls})
    found = [(f, text) for f in folders if (text := cache_text(f, remote)) is not None]
    if not found:
        return None
    (folder, text), others = found[0], [f for f in folders if f != found[0][0]]
    if others:
        raise ValueError(
            f"data.train_shards mixes the latent cache {redact(folder)} with shards from "
            f"{', '.join(map(redact, others[:3]))}: train on one cache folder, or on image "
            "shards only"
        )
    where = redact(f"{folder}/{CACHE_FILE}")
    try:
        info = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from e
    found = (info.get("format"), info.get("format_version"))
    if found != (CACHE_FORMAT, CACHE_FORMAT_VERSION):
        raise ValueError(
            f"{where}: format {found[0]!r} version {found[1]!r}; this sdtrain reads "
            f"{CACHE_FORMAT!r} version {CACHE_FORMAT_VERSION} (cache again with sdtrain-cache-latents)"
        )
    return info | {"folder": folder}


def parent(url: str) -> str:
    """The folder a shard is in: a local path's parent, a url up to its last "/" (query dropped);
    "" for a `pipe:` command, which has none."""
    if url.startswith("pipe:"):
        return ""
    if "://" in url:
        return url.split("?", 1)[0].rsplit("/", 1)[0]
    return str(Path(url).parent)


def cache_text(folder: str, remote: RemoteSettings | None) -> str | None:
    """The cache.json in `folder` (local or remote), or None when there is none."""
    if not folder:
        return None
    if "://" not in folder:
        path = Path(folder) / CACHE_FILE
        return path.read_text() if path.is_file() else None
    url = f"{folder}/{CACHE_FILE}"
    if not is_remote(url):
        return None
    data = read_remote(url, remote or RemoteSettings())
    return None if data is None else data.decode("utf-8", errors="replace")


def check_shard_kind(h, info: dict | None, urls: list[str], buckets: list | None) -> None:
    """Refuse data settings `h` (the datamodule's hyperparameters) that the shards cannot honour:
    `latent_cache` against what they are, a `resolution` other than a latent cache's (`info`,
    its parsed cache.json; None for image shards), `buckets` or `random_flip` on a cache."""
    if info is None:
        if h.latent_cache:
            raise ValueError(
                f"data.latent_cache=true, but data.train_shards ({urls[0]}, ...) is no "
                f"latent cache: its folder holds no {CACHE_FILE} (sdtrain-cache-latents writes "
                "it last, so an interrupted run leaves none)"
            )
        if h.resolution is None:
            raise ValueError(
                "data.resolution=null takes the size from a latent cache, but "
                f"data.train_shards ({urls[0]}, ...) are image shards: set a size"
            )
        return
    where = f"the latent cache {info['folder']}"
    if buckets is not None:
        raise ValueError(
            f"data.buckets={h.buckets!r} cannot apply to {where}: its images were cropped "
            "square when cached. Set data.buckets=null, or train on the image shards."
        )
    if h.latent_cache is False:
        raise ValueError(f"data.latent_cache=false, but data.train_shards is {where}")
    if h.resolution is not None and h.resolution != info["resolution"]:
        raise ValueError(
            f"data.resolution={h.resolution}, but {where} was made at {info['resolution']} "
            f"px ({CACHE_FILE}): set data.resolution={info['resolution']} (or null), or "
            f"cache again with --resolution {h.resolution}"
        )
    if h.random_flip:
        raise ValueError(
            f"data.random_flip=true cannot apply to {where}: its images were cached "
            "unflipped. Set data.random_flip=false, or train on the image shards to flip."
        )
