"""Which input URIs a manifest may name, and how a refused one is shown.

Conditioning inputs (`image`, `video`) are read by the workers with the job's own credentials,
so a manifest may name an object but never how to reach it: URIs carrying credentials, query
options (`?endpoint_override=...`) or a scheme other than file://, s3://, s3a://, gs:// are
refused, and their values are shown redacted.
"""

from __future__ import annotations

import contextlib
import re

from cogdist.storage import redact

# Input URIs a manifest may name (anything without "://" is a local path, as in cogdist.storage):
# a bucket and a key, or a local file; nothing that picks an endpoint, credentials or options.
# The same rule twice: as an RE2 pattern for whole columns, and in Python (uri_problem) to word
# the rows it refuses. ASCII classes, not (?i): case folding would accept "ſ3://".
INPUTSCHEMES = ("file", "s3", "s3a", "gs")
BUCKET = re.compile(r"[A-Za-z0-9._-]+")
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
ACCEPTED_URI = (
    r"^(?:(?:[Ss]3[Aa]?|[Gg][Ss])://[A-Za-z0-9._-]+|[Ff][Ii][Ll][Ee]://(?:localhost)?)(?:/[^?#]*)?$"
)


def public_uri(uri: str) -> str:
    """`uri` as a message may show it: more than storage.redact masks, since a refused URI may be
    malformed anywhere: user info, every query value and any fragment; all of it when what
    precedes "://" is not even a scheme."""
    if "://" not in uri:
        return uri
    scheme, _, rest = uri.partition("://")
    if not SCHEME.fullmatch(scheme):
        return "***"
    with contextlib.suppress(ValueError):  # urllib refuses some malformed hosts ("["): mask below
        rest = redact(uri).partition("://")[2]
    cut = re.search(r"[/?#]", rest)
    host, tail = (rest[: cut.start()], rest[cut.start() :]) if cut else (rest, "")
    if "@" in host:
        host = "***@" + host.rsplit("@", 1)[1]
    tail, hash_, _ = tail.partition("#")
    path, question, query = tail.partition("?")
    if question:
        path += "?" + "&".join(f"{item.partition('=')[0]}=***" for item in query.split("&"))
    return f"{scheme}://{host}{path}" + ("#***" if hash_ else "")


def uri_problem(uri: str) -> str | None:
    """Why a manifest may not name `uri` as an input, or None; the rule of ACCEPTED_URI, worded.
    Reasons quote nothing of the URI but a well-formed scheme: the value is shown masked."""
    if "://" not in uri:
        return None  # a local path
    scheme, _, rest = uri.partition("://")
    host = re.split(r"[/?#]", rest, maxsplit=1)[0]
    kind = scheme.lower() if scheme.isascii() else scheme
    if kind not in INPUTSCHEMES:
        what = (
            f"{scheme!r} is not a scheme" if SCHEME.fullmatch(scheme) else "what precedes '://' is no scheme"
        )
        return f"{what} cogdist reads inputs from; use a local path, file://, s3://, s3a:// or gs://"
    if "@" in host:
        return (
            "carries credentials (user:password@); inputs are read with the job's own credentials, "
            "so a manifest may not name others"
        )
    if "?" in rest:
        return (
            "carries query options ('?...'); a manifest may not choose the endpoint, credentials "
            "or other storage options of an input: they are the job's own"
        )
    if "#" in rest:
        return "has a '#' fragment, which would be dropped from the object's name"
    if kind == "file":
        if host not in ("", "localhost"):
            return "a file:// URI names no host; write file:///absolute/path"
        return None
    if not host:
        return f"names no bucket; write {kind}://bucket/key"
    if not BUCKET.fullmatch(host):
        return (
            "its bucket name holds a port or other characters a bucket name cannot hold; "
            f"write {kind}://bucket/key (the endpoint is the job's own)"
        )
    return None
