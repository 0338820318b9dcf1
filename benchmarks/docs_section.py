"""Benchmark scripts write their own section of a docs page (see `clora.pages`)."""
from clora.pages import update_section  # noqa: F401
