"""The chat's widgets, one per file."""
