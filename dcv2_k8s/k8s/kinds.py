"""The facts of each kind of job dcv2 runs on Kubernetes, one table per kind: PyTorchJob and TrainJob.

Where the kind lives in the API, its trainer container, how its pods are named and selected, which of them runs
rank 0, and the condition types that end it. The manifests are rendered with these facts, the pipeline's launcher
watches jobs with them and ``dcv2 k8s run-local`` starts a job's pods with them; the pipeline's ``launcher=``
parameter names a kind by ``KINDS``' key.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JobKind:
    """Where a kind of job lives in the API, its pods, which of them runs rank 0, and the conditions that end it."""

    kind: str
    group: str
    version: str
    plural: str
    container: str         # the trainer container of the job's pods
    replica: str           # a pod's hostname is <job>-<replica>-<index> (see pod())
    name_label: str        # the label every pod of the job carries, with the job's name as its value
    lead_labels: str       # the labels that narrow job_pods to the pods that may run rank 0 ("": none)
    succeeded: str         # the condition type of a job that succeeded
    failed: str = "Failed"
    index_annotation: str = ""  # when set: rank 0's pod is the one with this annotation "0" and the container

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    def job_selector(self, name: str) -> str:
        return f"{self.name_label}={name}"

    def lead_selector(self, name: str) -> str:
        return ",".join(s for s in (self.job_selector(name), self.lead_labels) if s)

    def pod_suffix(self, index: int, replica_type: str = "") -> str:
        """``<replica>-<index>``: the part of a pod's name after the job's name (``replica_type``: a PyTorchJob's
        Master or Worker, else the kind's ``replica``)."""
        return f"{(replica_type or self.replica).lower()}-{index}"

    def pod(self, job: str, index: int, replica_type: str = "") -> str:
        """The hostname of a pod of ``job``; a PyTorchJob's pod and its Service have that name too (a JobSet's pod
        name has a random suffix after it)."""
        return f"{job}-{self.pod_suffix(index, replica_type)}"


# training operator v1.9: our jobs have Worker replicas only (see manifests.py), so rank 0 runs on worker 0; the
# pods and their Services are named <job>-<replica type>-<index>, labels from pkg/apis/kubeflow.org/v1/common_types.go
PYTORCHJOB = JobKind("PyTorchJob", "kubeflow.org", "v1", "pytorchjobs", container="pytorch", replica="worker",
                     name_label="training.kubeflow.org/job-name",
                     lead_labels="training.kubeflow.org/replica-type=worker,training.kubeflow.org/replica-index=0",
                     succeeded="Succeeded")
# Trainer v2.3: a JobSet named after the TrainJob (its pods carry the label jobset.sigs.k8s.io/jobset-name and are
# named <jobset>-<replicated job>-<job index>-<pod index>: our runtime's one replicated job "node"); the indexed
# Job's completion index (annotation batch.kubernetes.io/job-completion-index) is PET_NODE_RANK
# (plugins/torch/torch.go), so rank 0 runs in the pod of index 0 with the "node" container; conditions
# Complete / Failed (pkg/apis/trainer/v1alpha1/trainjob_types.go)
TRAINJOB = JobKind("TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs", container="node", replica="node-0",
                   name_label="jobset.sigs.k8s.io/jobset-name", lead_labels="", succeeded="Complete",
                   index_annotation="batch.kubernetes.io/job-completion-index")
# the pipeline's launcher= value of each kind
KINDS = {k.kind.lower(): k for k in (PYTORCHJOB, TRAINJOB)}
