"""Model families: each declares itself in a `FamilySpec` (`<family>/__init__.py`, no torch) whose
runner (`<family>/runner.py`) builds, loads and renders; `registry` gathers the specs."""
