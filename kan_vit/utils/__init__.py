"""Helpers with no project imports, for every layer."""
