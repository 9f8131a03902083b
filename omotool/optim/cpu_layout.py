"""What the CPU kernels' host side (``optim.kernels``) and the kernels (``optim.cpu_kernels``)
agree on: the fixed work sizes, and numba's threading layer, set before numba is imported.

Its own module so that both import it and neither imports the other.
"""

from __future__ import annotations

import os

# numba's OpenMP layer loads a second libgomp beside torch's, whose threads spin-wait after
# each parallel region and starve torch's: one kernel call made every later training step
# 10-30x slower on a busy 2-core machine. The workqueue layer's threads do not spin. Set
# before numba is first imported (it reads the environment then); a user's choice stands.
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")

CHUNK = 1 << 14  # entries per work item; fixed, so that results do not depend on threads
SAMPLE = 1 << 12  # OnTIES floor: |Δθ| sampled at about this many entries per tensor
SAMPLE_RUN = 16  # ... in runs of this many neighbours (one 64-byte line of float32)
SAMPLE_AHEAD = 4  # ... the lines of the run this many runs on asked for in advance
BINS = 1 << 12  # OnTIES selection: histogram bins of the candidates' |Δθ| (float32 bits)
