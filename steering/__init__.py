"""tinymorph engine: model, generation with a prefix KV cache, SAE steering.

OpenMP's wait: importing the engine before torch sets `GOMP_SPINCOUNT` (unless set already) so that
the OpenMP worker thread spins ~25 ms after a forward before it sleeps (libgomp's default: ~7 ms).
Why: after a typing pause a keystroke took 16-17 ms instead of 6 ms (default model, 64 tokens, 2
cores; pauses of 100-500 ms between keystrokes, as people type); with this setting 8-10 ms. The
cost is ~25 ms of one core after each request. libgomp reads it once, when torch loads it.
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "1000000")
