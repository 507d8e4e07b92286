"""dagc's version, importable from every layer (generated files carry it in their header)."""

__version__ = "0.1.0"
