"""Scenarios shipped inside the package (the embedded default)."""
