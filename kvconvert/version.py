"""The package version (its own module so that any file may read it without importing the
public API above it)."""

__version__ = "0.1.0"
