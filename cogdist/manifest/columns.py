"""`--column-map`: manifest columns read under cogdist's names (id=key,prompt=caption,image=url)."""

from __future__ import annotations

from cogdist.errors import UsageError
from cogdist.manifest.schema import COLUMNS


def parse_column_map(text: str | None) -> dict[str, str]:
    """cogdist's column name -> the manifest's column it is read from ({} for None)."""
    if not text:
        return {}
    mapping: dict[str, str] = {}
    for pair in text.split(","):
        name, sep, column = (part.strip() for part in pair.partition("="))
        if not sep or not name or not column:
            raise UsageError(f"--column-map {text!r}: {pair!r} is not NAME=COLUMN (e.g. prompt=caption)")
        if name not in COLUMNS:
            raise UsageError(f"--column-map: {name!r} is not a column cogdist reads ({', '.join(COLUMNS)})")
        if name in mapping:
            raise UsageError(f"--column-map: {name!r} is mapped twice")
        mapping[name] = column
    return mapping


def column_map_record(text: str | None) -> dict[str, str] | None:
    """The job record's value of --column-map: the parsed map, null when none is given."""
    return parse_column_map(text) or None
