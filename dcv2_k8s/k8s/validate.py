"""Strict offline validation of manifests against the real API types.

PyTorchJobs are walked against the kubeflow-training SDK's models (``KubeflowOrgV1PyTorchJob`` and what it
references), the pod template against the kubernetes client's models: every field must exist in the model
(``attribute_map``) and have its type (``openapi_types``). The generated models themselves drop unknown fields
silently; this walker is what makes the check strict. Built-in kinds are checked with ``kubernetes-validate``
(strict, at a pinned Kubernetes version).
"""

from __future__ import annotations

import re

from dcv2_k8s.k8s.kinds import PYTORCHJOB

K8S_VERSION = "1.30"
_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float)}


def _model(name: str):
    import kubernetes.client.models as k8s

    try:
        import kubeflow.training.models as kf
    except ImportError:  # pragma: no cover - the test extra installs it
        kf = None
    for mod in (kf, k8s):
        if mod is not None and hasattr(mod, name):
            return getattr(mod, name)
    raise KeyError(name)


def check(value, type_name: str, path: str, errors: list[str]) -> None:
    """Append ``path: problem`` for every unknown field or wrong type under ``value``."""
    if value is None:
        return
    m = re.fullmatch(r"list\[(.+)\]", type_name)
    if m:
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {type(value).__name__}")
            return
        for i, v in enumerate(value):
            check(v, m.group(1), f"{path}[{i}]", errors)
        return
    m = re.fullmatch(r"dict\(str, (.+)\)", type_name)
    if m:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return
        for k, v in value.items():
            check(v, m.group(1), f"{path}.{k}", errors)
        return
    if type_name in ("object", "datetime", "date"):
        return
    if type_name in _PRIMITIVES:
        ok = isinstance(value, _PRIMITIVES[type_name]) and not (type_name != "bool" and isinstance(value, bool))
        if not ok:
            errors.append(f"{path}: expected {type_name}, got {type(value).__name__} {value!r}")
        return
    cls = _model(type_name)
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a {type_name} mapping, got {type(value).__name__}")
        return
    json_to_attr = {v: k for k, v in cls.attribute_map.items()}
    for key, v in value.items():
        attr = json_to_attr.get(key)
        if attr is None:
            errors.append(f"{path}.{key}: unknown field of {type_name}")
            continue
        check(v, cls.openapi_types[attr], f"{path}.{key}", errors)


def validate_pytorchjob(doc: dict) -> list[str]:
    errors: list[str] = []
    check(doc, "KubeflowOrgV1PyTorchJob", doc.get("metadata", {}).get("name", "PyTorchJob"), errors)
    specs = doc.get("spec", {}).get("pytorchReplicaSpecs", {})
    if set(specs) - {"Master", "Worker"}:
        errors.append(f"pytorchReplicaSpecs: only Master and Worker are allowed, got {sorted(specs)}")
    if "Master" in specs and specs["Master"].get("replicas", 1) != 1:
        errors.append("pytorchReplicaSpecs.Master.replicas must be 1")
    for rtype, rs in specs.items():
        names = [c.get("name") for c in rs.get("template", {}).get("spec", {}).get("containers", [])]
        if PYTORCHJOB.container not in names:
            errors.append(f"{rtype}: the training container must be named {PYTORCHJOB.container!r} (the operator "
                          "looks for it)")
    name = doc.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
        errors.append(f"metadata.name {name!r} must be a DNS-1035 label")
    # the rendezvous is reached through the Service the operator names after the job and the pod: a copy of a
    # manifest under another name that keeps the old endpoint waits for a host that does not exist
    lead = PYTORCHJOB.pod(name, 0, "Master" if "Master" in specs else "Worker")
    for rtype, rs in specs.items():
        for c in rs.get("template", {}).get("spec", {}).get("containers", []):
            for e in c.get("env", []) or []:
                if e.get("name") == "PET_RDZV_ENDPOINT" and isinstance(e.get("value"), str):
                    host = e["value"].rsplit(":", 1)[0]
                    if host != lead:
                        errors.append(f"{rtype}: PET_RDZV_ENDPOINT {e['value']!r} names {host!r}, but this job's "
                                      f"rendezvous host is {lead!r} (its Service): rename it with metadata.name")
    return errors


def validate_builtin(doc: dict) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {e.message} at {list(e.path)}"]
    return []
