"""Puts this folder on sys.path (pytest's prepend import mode does so for a conftest's
folder), so test modules anywhere below can import the shared helpers in cli_runs.py."""
