"""The command line: parses options, calls the core, renders results, maps errors to exits.

The only package that imports click. It never touches sockets or tar members.
"""

from bimcv_fetch.cli import check, fetch, local  # noqa: F401  (registers the commands)
from bimcv_fetch.cli.app import cli, main

__all__ = ["cli", "main"]
