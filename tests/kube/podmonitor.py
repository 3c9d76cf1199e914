"""A PodMonitor turned into a Prometheus ``scrape_configs`` entry, the way the Prometheus Operator does it, for the
end-to-end tests: there is no Prometheus Operator here, but the real Prometheus server (Debian's ``prometheus``
2.42) scrapes our pods, so it must get exactly the configuration the operator would give it.

Test infrastructure only. Written from the operator's source, not copied from it: prometheus-operator
``pkg/prometheus/promcfg.go`` at commit 6adcebc5076c34f4f55f8f5f7b1e528929373ac7 (v0.93.0 + 24 commits, 2026-08-08),
functions ``ConfigGenerator.generatePodMonitorConfig`` (the rules, in their order), ``generateK8SSDConfig`` and
``getNamespacesFromNamespaceSelector`` (the ``kubernetes_sd_configs`` entry), ``addTLStoYaml`` (``tls_config``),
``AddHonorLabels``, ``initRelabelings``, ``generateRunningFilter``, ``sanitizeLabelName`` and
``appendShardingRelabelingWithLabel``. The meta label names are those Prometheus's Kubernetes discovery sets for
role ``pod`` (prometheus ``discovery/kubernetes/pod.go`` at v2.42.0: ``podLabels`` and ``Pod.buildPod``):
``__meta_kubernetes_namespace``, ``__meta_kubernetes_pod_name``, ``__meta_kubernetes_pod_phase``,
``__meta_kubernetes_pod_label_<name>`` / ``__meta_kubernetes_pod_labelpresent_<name>`` (``<name>`` with every
character outside ``[a-zA-Z0-9_]`` replaced by ``_``, ``util/strutil.SanitizeLabelName``), and per container port
``__meta_kubernetes_pod_container_name``, ``..._container_port_name``, ``..._container_port_number``,
``..._container_port_protocol``, ``..._container_init`` (``"true"`` for an init container).

Supported: ``spec.selector`` (``matchLabels``; ``matchExpressions`` with In, NotIn, Exists, DoesNotExist),
``spec.namespaceSelector`` (``any`` / ``matchNames``), ``spec.podTargetLabels``, ``spec.jobLabel`` and one
``podMetricsEndpoints`` entry with ``port``, ``path``, ``interval``, ``scrapeTimeout``, ``filterRunning`` and
``honorLabels``. Anything else raises :class:`UnsupportedPodMonitor` naming it, rather than silently generating a
configuration the operator would not.

What the operator takes from the Prometheus object and this module fixes: no scrape class, no enforced namespace
label, no ``spec.podTargetLabels`` on the Prometheus, not in DaemonSet mode, one shard (``$(SHARD)``, which the
operator's config-reloader substitutes from its environment, is written as ``0``), and the API server given as
``api_server`` + client-certificate ``tls_config`` (the operator's ``spec.apiserverConfig``).
"""

from __future__ import annotations

import re

# promcfg.go sanitizeLabelName and prometheus util/strutil.SanitizeLabelName: the same expression.
_INVALID_LABEL_CHAR = re.compile(r"[^a-zA-Z0-9_]")

SUPPORTED_SPEC = {"selector", "namespaceSelector", "podTargetLabels", "podMetricsEndpoints", "jobLabel"}
SUPPORTED_ENDPOINT = {"port", "path", "interval", "scrapeTimeout", "filterRunning", "honorLabels"}
SUPPORTED_SELECTOR = {"matchLabels", "matchExpressions"}
SUPPORTED_NAMESPACE_SELECTOR = {"any", "matchNames"}
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
SHARD = "0"        # the value of $(SHARD) in a one-shard Prometheus
SHARDS = 1         # the Prometheus object's spec.shards (default 1)


class UnsupportedPodMonitor(ValueError):
    """The PodMonitor uses a feature this module does not generate."""


def sanitize_label_name(name: str) -> str:
    """A Kubernetes label key as it appears in a Prometheus label name (promcfg.go ``sanitizeLabelName``,
    prometheus ``util/strutil.SanitizeLabelName``)."""
    return _INVALID_LABEL_CHAR.sub("_", name)


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus duration (``1s``, ``15s``, ``1m30s``, ``500ms``)."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * units[u] for n, u in parts)


def _label(key: str) -> str:
    return "__meta_kubernetes_pod_label_" + sanitize_label_name(key)


def _present(key: str) -> str:
    return "__meta_kubernetes_pod_labelpresent_" + sanitize_label_name(key)


def _check(what: str, given: dict, supported: set) -> None:
    extra = sorted(set(given) - supported)
    if extra:
        raise UnsupportedPodMonitor(
            f"{what}: unsupported {', '.join(extra)} (supported: {', '.join(sorted(supported))})")


def scrape_config(podmonitor: dict, api_server: str, ca_file: str, cert_file: str, key_file: str,
                  namespaces: list[str] | None = None, interval: str | None = None) -> dict:
    """The ``scrape_configs`` entry the Prometheus Operator generates for ``podmonitor``'s first (and only)
    ``podMetricsEndpoints`` entry. ``namespaces``, when given, replaces the namespaces its ``namespaceSelector``
    gives (a test restricting discovery to its own namespace). ``interval`` replaces the endpoint's
    ``interval``; the scrape timeout is then the endpoint's ``scrapeTimeout`` capped at it (Prometheus refuses a
    timeout longer than the interval, and so does the operator: ``CompareScrapeTimeoutToScrapeInterval``)."""
    if podmonitor.get("kind") != "PodMonitor":
        raise UnsupportedPodMonitor(f"not a PodMonitor: kind {podmonitor.get('kind')!r}")
    meta = podmonitor["metadata"]
    name = meta["name"]
    # A PodMonitor without a namespace (ours: `kubectl apply -k` puts them in the context's namespace) is taken
    # to be in "default".
    namespace = meta.get("namespace", "default")
    spec = podmonitor.get("spec", {})
    _check("spec", spec, SUPPORTED_SPEC)
    endpoints = spec.get("podMetricsEndpoints") or []
    if len(endpoints) != 1:
        raise UnsupportedPodMonitor(f"spec.podMetricsEndpoints: exactly one entry is supported, got {len(endpoints)}")
    ep = endpoints[0]
    _check("podMetricsEndpoints[0]", ep, SUPPORTED_ENDPOINT)
    selector = spec.get("selector") or {}
    _check("spec.selector", selector, SUPPORTED_SELECTOR)
    nsel = spec.get("namespaceSelector") or {}
    _check("spec.namespaceSelector", nsel, SUPPORTED_NAMESPACE_SELECTOR)
    for exp in selector.get("matchExpressions") or []:
        if exp.get("operator") not in OPERATORS:
            raise UnsupportedPodMonitor(f"spec.selector.matchExpressions: unsupported operator {exp.get('operator')!r}")

    # generatePodMonitorConfig: job_name "podMonitor/<namespace>/<name>/<endpoint index>".
    cfg: dict = {"job_name": f"podMonitor/{namespace}/{name}/0"}
    # generatePodMonitorConfig -> AddHonorLabels: always written, false unless the endpoint says true.
    cfg["honor_labels"] = bool(ep.get("honorLabels", False))

    # generatePodMonitorConfig -> generateK8SSDConfig(role "pod"): role, then namespaces.names from
    # getNamespacesFromNamespaceSelector (`any: true` -> no list, i.e. every namespace; matchNames -> those;
    # neither -> the PodMonitor's own namespace), then api_server and addTLStoYaml's tls_config (ca_file,
    # cert_file, key_file in that order) from the Prometheus object's apiserverConfig.
    sd: dict = {"role": "pod"}
    if namespaces is not None:
        names = list(namespaces)
    elif nsel.get("any"):
        names = []
    else:
        names = list(nsel.get("matchNames") or []) or [namespace]
    if names:
        sd["namespaces"] = {"names": names}
    sd["api_server"] = api_server
    sd["tls_config"] = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
    cfg["kubernetes_sd_configs"] = [sd]

    # generatePodMonitorConfig: scrape_interval from ep.Interval, scrape_timeout from ep.ScrapeTimeout, then
    # metrics_path from ep.Path, each only when set (Prometheus's global defaults otherwise).
    timeout = ep.get("scrapeTimeout")
    if interval is not None:
        cfg["scrape_interval"] = interval
        if timeout is not None and parse_duration(timeout) > parse_duration(interval):
            timeout = interval
    elif ep.get("interval"):
        cfg["scrape_interval"] = ep["interval"]
    if timeout:
        cfg["scrape_timeout"] = timeout
    if ep.get("path"):
        cfg["metrics_path"] = ep["path"]

    # initRelabelings: copy the job label (the job_name) into __tmp_prometheus_job_name.
    rules: list[dict] = [{"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"}]
    # generatePodMonitorConfig: unless ep.FilterRunning is false, generateRunningFilter drops pods in phase Failed
    # or Succeeded (operator v0.60.0 onwards, PR #5049 "Add a filter for non-running pods", 2022-09-28).
    if ep.get("filterRunning", True):
        rules.append({"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"],
                      "regex": "(Failed|Succeeded)"})

    # generatePodMonitorConfig, selectorMechanism Relabel (the default): one keep rule per matchLabels key in
    # sorted key order, on the label's value and its presence, regex "(<value>);true" (the value is not
    # regex-escaped: the operator does not escape it either).
    match_labels = selector.get("matchLabels") or {}
    for key in sorted(match_labels):
        rules.append({"action": "keep", "source_labels": [_label(key), _present(key)],
                      "regex": f"({match_labels[key]});true"})
    # ... then matchExpressions in their order: In -> keep "(v1|v2);true" on value + presence; NotIn -> drop with
    # the same regex; Exists -> keep on presence == "true"; DoesNotExist -> drop on presence == "true".
    for exp in selector.get("matchExpressions") or []:
        key, op = exp["key"], exp["operator"]
        if op in ("In", "NotIn"):
            rules.append({"action": "keep" if op == "In" else "drop", "source_labels": [_label(key), _present(key)],
                          "regex": f"({'|'.join(exp.get('values') or [])});true"})
        else:
            rules.append({"action": "keep" if op == "Exists" else "drop", "source_labels": [_present(key)],
                          "regex": "true"})

    # generatePodMonitorConfig: keep only the container port named ep.Port (__meta_kubernetes_pod_container_port_name;
    # a container without ports has no such label and is dropped). Init containers are not filtered out: the
    # operator has no rule on __meta_kubernetes_pod_container_init.
    port = ep.get("port")
    if port:
        rules.append({"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                      "regex": port})

    # generatePodMonitorConfig: namespace, container and pod target labels from the meta labels.
    rules += [
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
    ]
    # generatePodMonitorConfig: each podTargetLabels entry copied from the pod label to a target label of the
    # sanitized name, only when non-empty (regex "(.+)", replacement "${1}").
    for key in spec.get("podTargetLabels") or []:
        rules.append({"source_labels": [_label(key)], "target_label": sanitize_label_name(key),
                      "regex": "(.+)", "replacement": "${1}"})
    # generatePodMonitorConfig: job = "<namespace>/<name>", then overridden by the jobLabel pod label when set and
    # non-empty.
    rules.append({"target_label": "job", "replacement": f"{namespace}/{name}"})
    if spec.get("jobLabel"):
        rules.append({"source_labels": [_label(spec["jobLabel"])], "target_label": "job",
                      "regex": "(.+)", "replacement": "${1}"})
    # generatePodMonitorConfig: endpoint = the port name.
    if port:
        rules.append({"target_label": "endpoint", "replacement": port})

    # generatePodMonitorConfig -> appendShardingRelabelingWithAddress -> appendShardingRelabelingWithLabel
    # ("__address__"; no retention policies, no topology sharding): hash the address into __tmp_hash modulo the
    # shard count and keep the targets of this shard, unless __tmp_disable_sharding is set.
    rules += [
        {"source_labels": ["__address__", "__tmp_hash"], "target_label": "__tmp_hash", "regex": "(.+);",
         "replacement": "$1", "action": "replace"},
        {"source_labels": ["__tmp_hash"], "target_label": "__tmp_hash", "modulus": SHARDS, "action": "hashmod"},
        {"source_labels": ["__tmp_hash", "__tmp_disable_sharding"], "regex": f"{SHARD};|.+;.+", "action": "keep"},
    ]
    cfg["relabel_configs"] = rules
    return cfg


def discovered_targets(pod: dict) -> list[dict]:
    """The targets Prometheus's Kubernetes discovery (role ``pod``) makes of a Pod object, as ``file_sd`` /
    ``http_sd`` target groups (one per target, since the labels differ per container port). Follows prometheus
    ``discovery/kubernetes/pod.go`` at v2.42.0: ``Pod.buildPod`` (no pod IP -> no targets; one target per container
    port, containers first then init containers; a container without ports -> one target at the bare pod IP with
    no port labels) and ``podLabels`` (pod-level meta labels; pod labels and annotations under their sanitized
    names with a ``...present_`` twin; ``pod_ready`` from the Ready condition, "unknown" without one; controller
    kind and name from the controlling ownerReference).

    For tests: Debian's ``prometheus`` is built without Kubernetes discovery, so a test can serve these groups
    through ``file_sd_configs`` or ``http_sd_configs`` in place of ``kubernetes_sd_configs``."""
    meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
    ip = status.get("podIP") or ""
    if not ip:
        return []
    ready = next((c["status"].lower() for c in status.get("conditions") or [] if c.get("type") == "Ready"),
                 "unknown")
    labels = {
        "__meta_kubernetes_namespace": meta.get("namespace", "default"),
        "__meta_kubernetes_pod_name": meta["name"],
        "__meta_kubernetes_pod_ip": ip,
        "__meta_kubernetes_pod_ready": ready,
        "__meta_kubernetes_pod_phase": status.get("phase", ""),
        "__meta_kubernetes_pod_node_name": spec.get("nodeName", ""),
        "__meta_kubernetes_pod_host_ip": status.get("hostIP", ""),
        "__meta_kubernetes_pod_uid": meta.get("uid", ""),
    }
    owner = next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), None)
    if owner:
        if owner.get("kind"):
            labels["__meta_kubernetes_pod_controller_kind"] = owner["kind"]
        if owner.get("name"):
            labels["__meta_kubernetes_pod_controller_name"] = owner["name"]
    for kind, items in (("label", meta.get("labels")), ("annotation", meta.get("annotations"))):
        for k, v in (items or {}).items():
            labels[f"__meta_kubernetes_pod_{kind}_{sanitize_label_name(k)}"] = v
            labels[f"__meta_kubernetes_pod_{kind}present_{sanitize_label_name(k)}"] = "true"
    groups = []
    for init, key, statuses in ((False, "containers", "containerStatuses"),
                                (True, "initContainers", "initContainerStatuses")):
        ids = {s["name"]: s.get("containerID", "") for s in status.get(statuses) or []}
        for c in spec.get(key) or []:
            base = {**labels, "__meta_kubernetes_pod_container_name": c["name"],
                    "__meta_kubernetes_pod_container_id": ids.get(c["name"], ""),
                    "__meta_kubernetes_pod_container_image": c.get("image", ""),
                    "__meta_kubernetes_pod_container_init": "true" if init else "false"}
            if not c.get("ports"):
                groups.append({"targets": [ip], "labels": base})
            for p in c.get("ports") or []:
                number = str(p["containerPort"])
                host = f"[{ip}]" if ":" in ip else ip
                groups.append({"targets": [f"{host}:{number}"], "labels": {
                    **base, "__meta_kubernetes_pod_container_port_name": p.get("name", ""),
                    "__meta_kubernetes_pod_container_port_number": number,
                    "__meta_kubernetes_pod_container_port_protocol": p.get("protocol", "TCP")}})
    return groups
