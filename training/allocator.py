"""Keep freed tensor memory in the process for reuse while training on CPU (glibc's malloc).

glibc hands every allocation larger than its mmap threshold (128 KiB at start, raised on the fly up to 32 MiB
as such blocks are freed) straight to the kernel with `mmap`, and gives it back with `munmap` when freed. A
training step on CPU allocates and frees the same activation and gradient tensors every step, so each step
faults in fresh zeroed pages for them. Fixing the threshold at its ceiling serves them from the heap instead,
where the memory freed by one step is reused by the next. Measured on the project's 2-core EPYC, nanoGPT's
quick-start model (4 x 128, 12 x 64 tokens, bf16), the first 300 steps of a fresh process, A/B in turn: 32.2 vs
34.9, 33.1 vs 35.0 and 37.4 vs 41.1 ms per step. Peak memory is unchanged (the heap holds what the step frees,
which the next step takes again); jemalloc or tcmalloc (`LD_PRELOAD`) do the same job where installed.
"""

from __future__ import annotations

import ctypes
import logging
import platform

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD_CEILING = 32 * 1024 * 1024  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: glibc refuses more


def keep_freed_memory_for_reuse() -> bool:
    """Fix glibc's mmap threshold at its ceiling; True where that was done (Linux with glibc), else False."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc's soname (find_library would start ldconfig)
        done = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_CEILING))
    except (OSError, AttributeError):
        done = False
    if not done:
        logger.debug("mallopt(M_MMAP_THRESHOLD) not available; glibc's default allocation policy stays")
    return done
