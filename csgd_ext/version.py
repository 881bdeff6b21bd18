"""The package version, in one place (``csgd_ext.__version__``)."""

__version__ = "0.1.0"
