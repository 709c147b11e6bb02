"""JSON schemas shipped with the package (data only)."""
