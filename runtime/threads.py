"""Thread count for numba kernels: default all cores, like llama.cpp's -t."""

import os


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def set_threads(n: int | None) -> int:
    import numba

    n = default_threads() if not n or n <= 0 else min(int(n), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    return n
