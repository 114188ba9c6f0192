"""Output names: safe, inside OUT, distinct for distinct ids."""

from __future__ import annotations

import posixpath

from cogdist.sink.naming import OUTPUTS, output_path

HOSTILE = [
    "../../etc/passwd",
    "/absolute/path",
    "a/b/c",
    "..",
    ".",
    ".hidden",
    "with space",
    "tab\tand\nnewline",
    "ünïcødé ☃ 雪",
    "C:\\windows\\system32",
    "x" * 5000,
    "NUL",
    "-rf",
    "%2e%2e%2f",
    "id\x00with-nul",
]


def test_hostile_ids_stay_inside_outputs():
    for item_id in HOSTILE:
        path = output_path(item_id, "png")
        normal = posixpath.normpath(path)
        assert normal == path, item_id
        assert normal.startswith(f"{OUTPUTS}/"), item_id
        parts = path.split("/")
        assert len(parts) == 3 and all(p and p not in (".", "..") for p in parts), item_id
        assert all(c.isascii() and (c.isalnum() or c in "._-/") for c in path), item_id
        assert len(parts[-1]) < 100 and not parts[-1].startswith(".")


def test_ids_that_look_alike_get_different_names():
    similar = ["a/b", "a_b", "a-b", "a b", "A-B", "a\\b", "a//b", "ä-b", "a-b "]
    names = {output_path(i, "png") for i in similar}
    assert len(names) == len(similar)
    assert len({n.lower() for n in names}) == len(similar)  # case-insensitive file systems too


def test_names_are_deterministic_and_readable():
    assert output_path("cat-001", "png") == output_path("cat-001", "png")
    assert "/cat-001_" in output_path("cat-001", "png")
    assert output_path("cat-001", "jpg").endswith(".jpg")
