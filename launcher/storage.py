"""Where checkpoints live: a local directory or object storage named by an fsspec URL.

(docs/design.md, Checkpoints in object storage)
"""
from __future__ import annotations

import re

URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path) -> bool:
    """An fsspec URL (s3://bucket/prefix, gs://...) rather than a local path."""
    return bool(URL.match(str(path))) and not str(path).startswith("file://")
