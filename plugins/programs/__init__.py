"""programs: which program sent each flow, and rules by program (plugins/programs/README.md)."""

from .plugin import Programs

__all__ = ["Programs"]
