"""The exit-code contract (dcv2_k8s/exitcodes.py) against the training operator's rule for
``restartPolicy: ExitCode``: kubeflow/training-operator v1.9 pkg/util/train/train_util.go
``IsRetryableExitCode(exitCode) = exitCode >= 128``; a retryable pod is recreated, any other failure fails the job
(pkg/controller.v1/common/pod.go). End-to-end cases (a config mistake in a pod, a lost peer pod, preemption of the
container's main process) are in tests/test_faults.py."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from dcv2_k8s import exitcodes as X
from dcv2_k8s.storage import StorageError


def test_codes_sit_on_the_right_side_of_the_operator_rule():
    assert not X.retryable(X.ERROR) and not X.retryable(X.USAGE)
    assert X.retryable(X.PREEMPTED) and X.retryable(X.RETRYABLE) and X.retryable(137)
    assert X.retryable(0xBEEF)  # the operator's placeholder when the main container has no exit code (init failed)


@pytest.mark.parametrize("codes,launcher,signalled,node", [
    ([0, 0], 0, False, X.OK),
    ([X.PREEMPTED, X.PREEMPTED], 1, False, X.PREEMPTED),   # torchrun exits 1 after SIGTERM: the ranks' 143 wins
    ([0, 0], 1, True, X.PREEMPTED),                         # the container was signalled
    ([X.USAGE, X.RETRYABLE], 1, False, X.USAGE),            # a mistake on one rank stays permanent
    ([X.ERROR, X.RETRYABLE], 1, False, X.ERROR),
    ([X.RETRYABLE], 1, False, X.RETRYABLE),                 # one rank lost its peer, the other was killed
    ([], 1, False, X.RETRYABLE),                            # rendezvous failed before any rank ran
    ([X.USAGE], 1, True, X.PREEMPTED),                      # preemption first: the restart re-reports the mistake
])
def test_node_code_combines_the_processes(codes, launcher, signalled, node):
    assert X.combine(codes, launcher, signalled) == node


@pytest.mark.parametrize("exc,code", [
    (StorageError("s3://b: cannot reach the S3 endpoint", transient=True), X.RETRYABLE),
    (StorageError("s3://b: bucket does not exist"), X.ERROR),
    (dist.DistNetworkError("Connection reset by peer"), X.RETRYABLE),
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"), X.RETRYABLE),
    (RuntimeError("Timed out after 20 seconds waiting for clients"), X.RETRYABLE),
    (ValueError("shape mismatch"), X.ERROR),
    (KeyError("x"), X.ERROR),
])
def test_exceptions_are_classified(exc, code):
    assert X.classify(exc) == code
