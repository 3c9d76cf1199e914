"""The exit-code contract of every ``dcv2`` process, as Kubernetes restart policies read it.

The training operator's ``restartPolicy: ExitCode`` recreates a pod whose container exited with a code >= 128 and
fails the job on any other non-zero code (kubeflow/training-operator v1.9 ``pkg/util/train/train_util.go``:
``IsRetryableExitCode(exitCode) = exitCode >= 128``; ``pkg/controller.v1/common/pod.go``). So:

- permanent (< 128): retrying gives the same result, the job must fail at once;
- retryable (>= 128): the pod should be recreated and the run resumes from its last committed checkpoint.
"""

from __future__ import annotations

OK = 0
ERROR = 1           # an unexpected error in dcv2 itself, or a training failure that a retry would repeat (NaN loss)
USAGE = 2           # configuration, data or environment the user must fix (a full disk included: see classify)
# A newer run took over CHECKPOINT.DIR (a replacement pod while this one was cut off, or the job submitted again
# with the same output URI): this writer is a zombie. Permanent on purpose: a recreated pod would take the directory
# back (a new generation), fence the newer run in turn, and the two would take turns forever. The newer run goes on.
FENCED = 3
INTERRUPTED = 130   # 128 + SIGINT (Ctrl-C): as PREEMPTED, a checkpoint was committed; the next start resumes
PREEMPTED = 143     # 128 + SIGTERM: a checkpoint was committed (or the previous one stays latest); resume on restart
RETRYABLE = 200     # an infrastructure fault: a lost peer, a collective timeout, a failed rendezvous, a store outage

NAMES = {OK: "ok", ERROR: "error", USAGE: "usage", FENCED: "fenced", INTERRUPTED: "interrupted",
         PREEMPTED: "preempted", RETRYABLE: "retryable"}


def retryable(code: int) -> bool:
    """The training operator's rule for ``restartPolicy: ExitCode``."""
    return code >= 128


def combine(codes: list[int], launcher_code: int, signalled: bool, interrupted: bool = False) -> int:
    """The exit code of a node (the container) from its processes' own codes (``codes``: those that reported one)
    and the local launcher's (torchrun's) exit code.

    SIGTERM to the container wins (preemption: retry), then SIGINT (Ctrl-C: interrupted). Otherwise a permanent
    code of any process wins (a config or NaN failure must not be retried), then a retryable one (143, then 130,
    then 200); a launcher that failed without any process reporting
    (a rendezvous that did not complete, a process killed by the kernel) is an infrastructure fault."""
    if signalled:
        return PREEMPTED
    if interrupted:
        return INTERRUPTED
    failed = [c for c in codes if c != OK]
    permanent = [c for c in failed if not retryable(c)]
    if permanent:
        return USAGE if USAGE in permanent else permanent[0]
    if failed:
        return next((c for c in (PREEMPTED, INTERRUPTED) if c in failed), RETRYABLE)
    if launcher_code != OK:
        return RETRYABLE
    return OK


def classify(exc: BaseException) -> int:
    """The exit code for an exception that ended a training process."""
    from dcv2_k8s.storage import DiskFull, Fenced, StorageError

    if isinstance(exc, Fenced):  # a newer run owns the checkpoint directory: never retried (see FENCED)
        return FENCED
    if isinstance(exc, DiskFull):  # the checkpoint volume is full: a recreated pod meets the same volume, so the
        return USAGE               # job fails at once and the operator frees space (or a bigger volume), then resumes
    if isinstance(exc, StorageError):
        return RETRYABLE if getattr(exc, "transient", False) else ERROR
    try:
        import torch.distributed as dist

        dist_errors = tuple(getattr(dist, n) for n in ("DistError", "DistBackendError", "DistNetworkError",
                                                       "DistStoreError") if hasattr(dist, n))
    except ImportError:  # pragma: no cover
        dist_errors = ()
    if dist_errors and isinstance(exc, dist_errors):
        return RETRYABLE
    text = str(exc)
    if isinstance(exc, (RuntimeError, ConnectionError, TimeoutError)) and any(
            s in text for s in ("NCCL", "Gloo", "gloo", "Connection reset", "Connection refused", "Connection closed",
                                "timed out", "Timed out", "Broken pipe", "peer")):
        return RETRYABLE
    return ERROR
