"""Manifests: find the Parquet files, validate every row, stream rows as WorkItems."""

from cogdist.manifest.source import ManifestSource
from cogdist.manifest.validate import ValidationReport, validate_manifest

__all__ = ["ManifestSource", "ValidationReport", "validate_manifest"]
