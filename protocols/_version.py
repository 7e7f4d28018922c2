"""The single source of Fedge's version."""

__version__ = "0.1.0"
