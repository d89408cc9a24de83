"""Alembic's environment and versions, shipped inside the wheel as ``trainserve.migrations``."""
