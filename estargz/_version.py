"""The package version, apart from ``estargz/__init__.py`` so that modules
can name it without importing the whole public API."""

__version__ = "0.1.0"
