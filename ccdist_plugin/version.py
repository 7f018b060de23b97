"""The package's version (one place: the package, ``ccdist --version`` and the reports read it here)."""

__version__ = "0.1.0"
