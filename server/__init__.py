"""tinymorph protocol layer: CLI, LSP server, HTTP API."""
