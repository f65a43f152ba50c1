"""Stage 4: code generation (SymPy -> torch source through Jinja templates)."""
from .emit import class_name, emit

__all__ = ["class_name", "emit"]
