"""`dcv2 k8s validate` on our own files: built-in kinds of every API group, directories, what is skipped."""

from __future__ import annotations

import yaml

from dcv2_k8s.k8s.validate import builtin_kinds, load_crds, problems_of, validate_paths
from tests.conftest import ROOT, run_cli

MAN = ROOT / "manifests"
CRDS = ROOT / ".venv" / "compat" / "trainer-v2.3.0"   # fetched by `make` (see tests/test_trainjob.py)
# the Prometheus operator's kinds: their CRDs are not among the offline inputs, so each is one "no CRD" line
UNCHECKED = {"PodMonitor", "PrometheusRule"}


def test_every_file_under_manifests_validates():
    p = run_cli("k8s", "validate", str(MAN), "--crds", str(CRDS), timeout=120)
    lines = p.stdout.splitlines()
    files = sorted(f for f in MAN.rglob("*") if f.suffix in (".yaml", ".yml"))
    assert lines[-1] == f"{len(files)} files, 3 problems", p.stdout + p.stderr
    problems = [ln for ln in lines[:-1] if ": skipped: " not in ln]
    assert {ln.split(": ")[1] for ln in problems} == UNCHECKED, problems
    assert all("no CRD to check it against; pass --crds DIR" in ln and "monitoring.coreos.com" in ln
               for ln in problems)
    skipped = [ln.split(": ")[0] for ln in lines if ": skipped: a Kustomization" in ln]
    assert skipped == [str(MAN / "kustomization.yaml"), str(MAN / "monitoring" / "kustomization.yaml")]
    # everything else is checked: each kind of our manifests goes to a check, none to the "no CRD" line
    crds = load_crds(str(CRDS))
    kinds = set()
    for f in files:
        for d in yaml.safe_load_all(f.read_text()):
            if d and d["kind"] not in UNCHECKED | {"Kustomization"}:
                assert problems_of(d, crds) == [], f
                kinds.add(d["kind"])
    assert {"Role", "RoleBinding", "ServiceAccount", "Secret", "PyTorchJob", "TrainJob", "TrainingRuntime"} <= kinds


def test_rbac_file_validates_and_a_directory_is_walked(tmp_path):
    p = run_cli("k8s", "validate", str(MAN / "rbac-launcher.yaml"), timeout=120)
    assert p.returncode == 0 and p.stdout.splitlines()[-1] == "1 file, 0 problems", p.stdout + p.stderr
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / "b" / "c" / "role.yml").write_text((MAN / "rbac-launcher.yaml").read_text())
    (tmp_path / "a.yaml").write_text("name: not a manifest\nvalues: [1, 2]\n")
    (tmp_path / "b" / "bad.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "x"},
         "spec": {"podSelectorr": {}}}))
    (tmp_path / "notes.txt").write_text("not YAML")
    p = run_cli("k8s", "validate", str(tmp_path), timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == f"{tmp_path / 'a.yaml'}: skipped: not a Kubernetes object (no apiVersion and kind)"
    assert lines[1].startswith(f"{tmp_path / 'b' / 'bad.yaml'}: NetworkPolicy/x: ") and "podSelector" in lines[1]
    assert lines[-1] == "3 files, 1 problem"


def test_built_in_kinds_are_known_by_group_version_and_kind():
    known = builtin_kinds()
    for gvk in [("rbac.authorization.k8s.io", "v1", "Role"), ("apps", "v1", "Deployment"), ("batch", "v1", "Job"),
                ("networking.k8s.io", "v1", "NetworkPolicy"), ("policy", "v1", "PodDisruptionBudget"),
                ("", "v1", "Secret")]:
        assert gvk in known
    doc = {"apiVersion": "v1", "kind": "Secrett", "metadata": {"name": "x"}}
    assert problems_of(doc, {}) == ["Secrett: v1 has no kind Secrett in Kubernetes 1.30; check apiVersion and kind"]
    # a custom resource whose kind a built-in group also has is still a custom resource
    cr = {"apiVersion": "apps.example.com/v1", "kind": "Deployment", "metadata": {"name": "x"}}
    assert problems_of(cr, {})[0].startswith("Deployment: no CRD to check it against; pass --crds DIR")


def test_paths_and_crd_dirs_that_are_not_there_are_one_line(tmp_path):
    for args, line in [(["nope"], "dcv2: error: nope: no such file or directory"),
                       ([str(tmp_path)], f"dcv2: error: {tmp_path}: no .yaml or .yml files in this directory"),
                       ([str(MAN / "rbac-launcher.yaml"), "--crds", str(tmp_path)],
                        f"dcv2: error: --crds {tmp_path}: no .yaml or .yml files in this directory")]:
        p = run_cli("k8s", "validate", *args, timeout=120)
        assert p.returncode == 2 and p.stderr.strip() == line, p.stderr
    (tmp_path / "x.yaml").write_text("key: [unclosed\n")
    lines, files, problems = validate_paths([str(tmp_path)], {})
    assert files == 1 and problems == 1 and lines[0].startswith(f"{tmp_path / 'x.yaml'}: not readable YAML (")
