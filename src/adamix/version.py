"""The package version (recorded in every artifact and work folder)."""

__version__ = "0.1.0"
