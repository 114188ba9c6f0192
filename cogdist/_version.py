"""The version, alone in a module: pyproject.toml reads it, and modules anywhere in the package
import it without importing the package root (which pulls in the whole API)."""

__version__ = "0.1.0"
