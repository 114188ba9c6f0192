"""Output names: any id maps to a safe, collision-free path inside OUT.

`outputs/<h2>/<slug>_<h20>.<ext>` where h = sha256(id) in hex. The slug keeps names readable;
the 80-bit hash keeps them unique (a collision needs ~10^12 ids) and independent of case, so
ids that differ only in characters the slug drops, or in case, still get distinct files. The
two-character shard keeps folders small at millions of outputs. Nothing of the id reaches the
path except [A-Za-z0-9._-], so `/`, `..`, spaces or unicode can never leave OUT.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

OUTPUTS = "outputs"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SLUG_LIMIT = 60


def slug(item_id: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", item_id).encode("ascii", "ignore").decode("ascii")
    text = _UNSAFE.sub("-", ascii_text).strip(".-_")[:_SLUG_LIMIT].rstrip(".-_")
    return text or "item"


def output_path(item_id: str, extension: str) -> str:
    digest = hashlib.sha256(item_id.encode("utf-8")).hexdigest()
    return f"{OUTPUTS}/{digest[:2]}/{slug(item_id)}_{digest[:20]}.{extension}"


def frames_folder(item_id: str) -> str:
    """Where --save-frames puts a video's PNG frames: beside the video, named like it."""
    return output_path(item_id, "frames")


def sample_key(item_id: str) -> str:
    """A sample's key in a dataset shard: like its file name, without dots (WebDataset readers
    take everything after a name's first dot for the extension)."""
    digest = hashlib.sha256(item_id.encode("utf-8")).hexdigest()
    return f"{slug(item_id).replace('.', '_')}_{digest[:20]}"
