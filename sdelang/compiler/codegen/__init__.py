"""Stage 4: code generation (SymPy -> torch source through Jinja templates)."""
from .emit import UNCHECKED, class_name, emit

__all__ = ["UNCHECKED", "class_name", "emit"]
