"""Where checkpoints live: a local directory, or object storage named by an fsspec URL
(docs/design.md, Checkpoints in object storage).

A location is a `pathlib.Path` for a local directory and a `upath.UPath` (universal_pathlib, over
fsspec) for a URL: the two answer the same calls (`/`, name, is_file, iterdir, glob, read_text,
open, stat). What differs is here: object storage has no directories and no rename, and one object
written by one PUT is all or nothing.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import time
from pathlib import Path

from .errors import ConfigError
from .fs import write_atomic

URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
# The files whose presence makes a checkpoint (meta.json) or names one (latest): removed or moved
# first, so that a kill halfway through never leaves one that looks complete and is not.
MARKERS = ("meta.json", "latest")


def is_url(path) -> bool:
    """An fsspec URL (s3://bucket/prefix, gs://...) rather than a local path."""
    return bool(URL.match(str(path))) and not str(path).startswith("file://")


def location(path):
    """The Path or UPath of a local path or URL. Listings are never cached: the other ranks' and
    nodes' writes must be seen."""
    if not is_url(path):
        return Path(str(path).removeprefix("file://"))
    check_url(str(path))
    try:
        from upath import UPath

        found = UPath(str(path), use_listings_cache=False)
        found.fs  # the protocol's fsspec package is imported here, not at the first write
        return found
    except ImportError as e:  # universal_pathlib, or fsspec's package for the protocol (s3fs, gcsfs, ...)
        protocol = str(path).split("://")[0]
        fix = ("pip install 'launcher[s3]' (s3fs and universal_pathlib)" if protocol in ("s3", "s3a") else
               f"pip install universal_pathlib and fsspec's package for {protocol}://")
        raise ConfigError(f"checkpoint.dir={path} cannot be used: {str(e).splitlines()[0]}. {fix}") from None


def check_url(url: str) -> None:
    """Credentials belong in the environment (AWS_* variables, a profile), never in a config that is
    copied into the run dir, logged and put in manifests."""
    authority, _, prefix = url.split("://", 1)[1].partition("/")
    if "@" in authority:
        raise ConfigError(f"checkpoint.dir has credentials in its URL ({url.split('://')[0]}://<secret>@...): give "
                          "them in the environment instead (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE; "
                          "AWS_ENDPOINT_URL for a server other than AWS), and the bare URL in the config")
    if not prefix.strip("/"):
        raise ConfigError(f"checkpoint.dir={url} is a whole bucket: give a prefix in it for this run's checkpoints, "
                          f"e.g. {url.rstrip('/')}/my-run (a fresh start sets the earlier ones aside beside them)")


def is_remote(path) -> bool:
    return not isinstance(path, Path) or is_url(str(path))


def dcp_reader(path):
    """torch.distributed.checkpoint's reader for a local directory or an fsspec URL."""
    from torch.distributed.checkpoint import FileSystemReader

    if is_remote(path):  # torch's own, under a private name in torch 2.13
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        # torch.load reads each item's end before its start, and fsspec's default read-ahead cache
        # fetches another block (s3fs: 50 MiB) at every seek backwards, so each block was fetched
        # several times. A block cache fetches each once, holding at most 32 per open file.
        options = {"default_cache_type": "blockcache"} if str(path).startswith(("s3://", "s3a://")) else {}
        return FsspecReader(str(path), **options)
    return FileSystemReader(str(path))


def dcp_writer(path):
    from torch.distributed.checkpoint import FileSystemWriter

    if is_remote(path):  # torch's own, under a private name in torch 2.13
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(str(path))
    return FileSystemWriter(str(path))


def write_text(path, text: str) -> None:
    """All or nothing: a local file is replaced atomically; an object is one PUT."""
    if is_remote(path):
        path.write_text(text)
    else:
        write_atomic(path, text)


def make_dir(path) -> None:
    if not is_remote(path):  # object storage has prefixes, made by the objects under them
        path.mkdir(parents=True, exist_ok=True)


def remove_tree(path) -> None:
    """Remove a checkpoint (or its remains), its completion marker first."""
    if not is_remote(path):
        (path / "meta.json").unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        return
    files = sorted(path.fs.find(path.path), key=lambda f: os.path.basename(f) not in MARKERS)
    for file in files:  # markers first, one by one, for the order; then the rest at once
        if os.path.basename(file) in MARKERS:
            path.fs.rm_file(file)
    rest = [f for f in files if os.path.basename(f) not in MARKERS]
    if rest:
        path.fs.rm(rest)


def move_tree(path, to) -> None:
    """Set a checkpoint or a checkpoints directory aside. Local: one rename. Object storage copies
    each object and deletes it, markers first, so that what is left behind by a kill halfway is
    never taken for a complete checkpoint."""
    if not is_remote(path):
        path.rename(to)
        return
    src = path.path.rstrip("/")
    for file in sorted(path.fs.find(src), key=lambda f: os.path.basename(f) not in MARKERS):
        path.fs.mv(file, to.path.rstrip("/") + file[len(src):])


def check_reachable(path, what: str) -> None:
    """A small write, read and delete under `path` (exit 2 before any worker when it fails): a bucket
    that does not exist, credentials missing or refused, an endpoint that does not answer."""
    if not is_remote(path):
        from .fs import check_writable

        check_writable(path, what)
        return
    probe = path / f".launcher_write_test_{socket.gethostname()}_{os.getpid()}_{time.time_ns()}"
    try:
        probe.write_text("ok")
        probe.read_text()
        probe.unlink()
    except Exception as e:  # botocore's and s3fs's errors have no common base but Exception
        reason = (str(e).splitlines() or [e.__class__.__name__])[0][:200]
        raise ConfigError(
            f"{what} cannot be written ({e.__class__.__name__}: {reason}). Check that the bucket exists and that the "
            "credentials in the environment may write to it (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
            "AWS_PROFILE; AWS_ENDPOINT_URL for a server other than AWS)") from None
