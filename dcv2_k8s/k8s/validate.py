"""Strict offline validation of manifests against the real API types.

PyTorchJobs are walked against the kubeflow-training SDK's models (``KubeflowOrgV1PyTorchJob`` and what it
references), the pod template against the kubernetes client's models: every field must exist in the model
(``attribute_map``) and have its type (``openapi_types``). The generated models themselves drop unknown fields
silently; this walker is what makes the check strict. Built-in kinds are checked with ``kubernetes-validate``
(strict, at a pinned Kubernetes version); a kind is built in when that package's schemas for the version declare
its group, version and kind (``x-kubernetes-group-version-kind``). Custom resources are checked against their
CRDs (``crdschema``). :func:`validate_paths` is ``dcv2 k8s validate``: files and directories (every YAML file,
recursively), each document to its check, what is skipped and why.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import yaml

from dcv2_k8s.k8s.crdschema import validate_resource
from dcv2_k8s.k8s.kinds import PYTORCHJOB, TRAINJOB

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


@functools.lru_cache(maxsize=None)
def builtin_kinds(version: str = K8S_VERSION) -> frozenset[tuple[str, str, str]]:
    """``(group, version, kind)`` of every built-in kind of Kubernetes ``version`` (the core group is ""), as the
    strict schemas of the installed ``kubernetes-validate`` declare them."""
    try:
        import kubernetes_validate
        from kubernetes_validate.utils import all_versions, major_minor
    except ImportError:
        raise ValueError("checking built-in kinds needs kubernetes-validate: pip install 'kubernetes-validate>=1.30'") \
            from None
    # the same schema directory kubernetes_validate.validate picks: the newest release not newer than ``version``
    release = [v for v in all_versions() if tuple(map(int, major_minor(v).split("."))) <=
               tuple(map(int, major_minor(version).split(".")))][-1]
    path = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{release}-local-strict" / \
        "_definitions.json"
    defs = json.loads(path.read_text())["$defs"]
    return frozenset((g["group"], g["version"], g["kind"]) for d in defs.values()
                     for g in d.get("x-kubernetes-group-version-kind", []))


def problems_of(doc: dict, crds: dict[str, dict]) -> list[str]:
    """One document's problems: a PyTorchJob against the SDK models, a custom resource against its CRD (``crds``:
    kind -> CRD), a built-in kind against the Kubernetes schemas; a custom resource without its CRD is one line."""
    kind, api = doc.get("kind"), str(doc.get("apiVersion", ""))
    group, _, version = api.rpartition("/")
    if kind == "PyTorchJob":
        return validate_pytorchjob(doc)
    if kind in crds:
        return validate_resource(doc, crds[kind])
    known = builtin_kinds()
    if (group, version, kind) in known:
        return validate_builtin(doc)
    if group in {g for g, _, _ in known}:
        return [f"{kind}: {api} has no kind {kind} in Kubernetes {K8S_VERSION}; check apiVersion and kind"]
    example = " (e.g. Kubeflow Trainer's manifests/base/crds)" if group == TRAINJOB.group else ""
    return [f"{kind}: no CRD to check it against; pass --crds DIR, a directory holding the CustomResourceDefinition "
            f"of {group}{example}"]


def yaml_files(paths: list[str]) -> list[Path]:
    """The files named, and every ``.yaml``/``.yml`` file under the directories named (recursively, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in (".yaml", ".yml") and f.is_file())
            if not found:
                raise ValueError(f"{p}: no .yaml or .yml files in this directory")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise ValueError(f"{p}: no such file or directory")
    return out


def load_crds(directory: str) -> dict[str, dict]:
    """Kind -> CustomResourceDefinition, from the YAML files under ``directory``."""
    crds = {}
    try:
        paths = yaml_files([directory])
    except ValueError as e:
        raise ValueError(f"--crds {e}") from None
    for path in paths:
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"--crds {directory}: {path} is not readable YAML ({' '.join(str(e).split())[:200]}); "
                             "pass a directory of CustomResourceDefinition YAMLs only") from None
        for d in docs:
            if isinstance(d, dict) and d.get("kind") == "CustomResourceDefinition":
                crds[d["spec"]["names"]["kind"]] = d
    if not crds:
        raise ValueError(f"--crds {directory}: no CustomResourceDefinition in it; pass the directory of the CRD YAMLs")
    return crds


def _skip_reason(doc) -> str:
    """Why a document is no API object to check ("" when it is one)."""
    if doc is None:
        return "empty"
    if not isinstance(doc, dict) or ("kind" not in doc and "apiVersion" not in doc):
        return "skipped: not a Kubernetes object (no apiVersion and kind)"
    if doc.get("kind") == "Kustomization":
        return "skipped: a Kustomization (kustomize's build file, not an API object)"
    return ""


def validate_paths(paths: list[str], crds: dict[str, dict]) -> tuple[list[str], int, int]:
    """``(lines, files, problems)`` for ``dcv2 k8s validate PATH...``: a ``FILE: problem`` line per problem and a
    ``FILE: skipped: why`` line per document that is no API object. Raises ValueError for a path that is neither a
    file nor a directory holding YAML files."""
    lines: list[str] = []
    files = yaml_files(paths)
    problems = 0
    for f in files:
        try:
            docs = list(yaml.safe_load_all(f.read_text()))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            lines.append(f"{f}: not readable YAML ({' '.join(str(e).split())})")
            problems += 1
            continue
        for i, doc in enumerate(docs):
            why = _skip_reason(doc)
            if why:
                if why != "empty":
                    lines.append(f"{f}: {why}" + (f" (document {i + 1})" if len(docs) > 1 else ""))
                continue
            errs = problems_of(doc, crds)
            lines += [f"{f}: {e}" for e in errs]
            problems += len(errs)
    return lines, len(files), problems
