"""One BLAS thread while a fit runs.

The fits here have 2-5 parameters, and scipy's L-BFGS-B and least-squares solvers make thousands of BLAS
calls on arrays that small. A multithreaded OpenBLAS splits each call over its threads and waits for them,
and on a machine whose other cores are busy every wait is a scheduler time slice: measured on 2 cores with
one busy, a 17-iteration L-BFGS-B on 5 parameters took 31 ms with scipy's default 2 BLAS threads and 3 ms
with 1, and a bootstrap of a Chinchilla fit slows the same ~10x. threadpoolctl limits every BLAS loaded
in the process (scipy's bundled OpenBLAS, numpy's, MKL) for the duration of the fit only.
"""
from __future__ import annotations

import functools

from threadpoolctl import threadpool_limits


def single_threaded(fit):
    """Decorator: run `fit` with one BLAS thread."""
    @functools.wraps(fit)
    def wrapper(*args, **kwargs):
        with threadpool_limits(limits=1, user_api="blas"):
            return fit(*args, **kwargs)
    return wrapper
