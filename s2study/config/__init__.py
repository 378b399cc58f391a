"""Typed configs and their YAML loader."""
