"""The package version, apart from relex/__init__.py so that modules can name it without
importing the public API (which imports them)."""

__version__ = "0.1.0"
