"""Persistent state: the SQLite database beside the config file."""
