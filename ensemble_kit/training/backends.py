"""Where fold jobs run: in this process (``local``) or as Ray tasks on a cluster (``ray``).

A backend changes where a fold runs, never what it writes: each takes the fold function
itself (``run_jobs(jobs, fold_fn, backend)``), so this module knows nothing of ``cv``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import EkError
from ..registry import BACKENDS

log = logging.getLogger(__name__)

FoldFn = Callable[[Any], dict]


@BACKENDS.register("local")
def _run_local(jobs: Sequence, fold_fn: FoldFn) -> list[dict]:
    return [fold_fn(job) for job in jobs]


@BACKENDS.register("ray")
def _run_ray(jobs: Sequence, fold_fn: FoldFn) -> list[dict]:
    try:
        import ray
    except ImportError:
        raise EkError("the ray backend needs Ray: pip install 'ensemble-kit[ray]'") from None
    if not ray.is_initialized():
        ray.init(address="auto" if "RAY_ADDRESS" in os.environ else None)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
    remote = ray.remote(num_gpus=gpus)(fold_fn)
    return ray.get([remote.remote(job) for job in jobs])


def run_jobs(jobs: Sequence, fold_fn: FoldFn, backend: str = "local") -> list[dict]:
    """Run ``fold_fn`` on every job (a ``cv.FoldJob``) and return the summaries in order."""
    return BACKENDS.get(backend)(jobs, fold_fn)
