"""Where fold jobs run: in this process (``local``) or as Ray tasks on a cluster (``ray``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from .errors import EkError

log = logging.getLogger(__name__)
BACKENDS = ("local", "ray")


def run_jobs(jobs: Sequence, backend: str = "local") -> list[dict]:
    """Run fold jobs (``cv.FoldJob``) and return their summaries in order."""
    if backend == "local":
        return _run_local(jobs)
    if backend == "ray":
        return _run_ray(jobs)
    raise EkError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")


def _run_local(jobs: Sequence) -> list[dict]:
    from .cv import run_fold

    return [run_fold(job) for job in jobs]


def _run_ray(jobs: Sequence) -> list[dict]:
    try:
        import ray
    except ImportError:
        raise EkError("the ray backend needs Ray: pip install 'ensemble-kit[ray]'") from None
    from .cv import run_fold

    if not ray.is_initialized():
        ray.init(address="auto" if _cluster_address() else None)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
    remote = ray.remote(num_gpus=gpus)(run_fold)
    return ray.get([remote.remote(job) for job in jobs])


def _cluster_address() -> bool:
    return "RAY_ADDRESS" in os.environ
