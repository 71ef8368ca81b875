"""Recipes shipped with convlens (`convlens demo` runs demo.toml)."""
