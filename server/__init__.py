"""tinymorph protocol layer: CLI, LSP server, HTTP API."""

from .. import steering  # noqa: F401  (before any torch import: it sets OpenMP's wait, see its docstring)
