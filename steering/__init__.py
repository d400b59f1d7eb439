"""tinymorph engine: model, generation with a prefix KV cache, SAE steering."""
