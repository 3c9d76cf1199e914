"""``dcv2 report RUN``: the run's logged metrics as PNG plots and one self-contained HTML page.

Reads ``RUN/metrics.jsonl`` (written by rank 0 during training; ``RUN`` is the CHECKPOINT.DIR, local or
``s3://``) and draws loss, learning rate, throughput and data-wait share, k-means time, cluster health (empty
clusters, size entropy, NMI vs the previous epoch), k-NN accuracy (with the network at initialisation as the
floor) and the collapse diagnostics (trunk-feature mean cosine and effective rank, per-layer weight change, and
every collapse warning the run raised). For people without Grafana, and the pipeline's HTML artifact.

One directory can hold several runs (a new run after the checkpoints were removed) and several attempts of one
(each resume): the report draws the run that wrote the newest committed checkpoint, each attempt up to the step
where a later attempt resumed (the steps recomputed after a resume are drawn once), with the resumes marked. A log
written before events carried ``run_id`` reads as one run.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from pathlib import Path

from dcv2_k8s.storage import open_storage


def load_events(run: str) -> list[dict]:
    store = open_storage(run)
    path = store.join("metrics.jsonl")
    if not store.exists(path):
        raise FileNotFoundError(f"{path}: no metrics log (is {run} a CHECKPOINT.DIR of a run?)")
    return [json.loads(line) for line in store.get_bytes(path).decode().splitlines() if line.strip()]


def _position(e: dict, start: dict | None) -> float:
    """Where in the run (in steps done) an event belongs: a later attempt that resumed at step N redoes
    everything after N (the k-means of an epoch runs before its first step, the k-NN check after its last)."""
    spe = (start or {}).get("steps_per_epoch", 1)
    if "global_step" in e:
        return e["global_step"]
    if e.get("kind") == "kmeans":
        return e["epoch"] * spe + 0.5
    if e.get("kind") in ("knn", "diagnostics"):
        return e["epoch"] * spe
    if str(e.get("name", "")).startswith("step_"):  # checkpoint_done
        return int(e["name"][5:])
    return float("-inf")


def select_run(events: list[dict], newest: dict | None) -> tuple[list[dict], list[dict], list]:
    """(the events to draw, the run_start events of its resumed attempts, the other runs' ids in the log).

    The run drawn is the one that wrote ``newest`` (the manifest of the newest committed checkpoint), or, when
    there is none or the log holds none of that run's events, the run of the last event. Events without a
    ``run_id`` (a log from before run ids) are one run; when the drawn run began by resuming a checkpoint written
    before run ids, they are its earlier attempts."""
    ids = list(dict.fromkeys(e.get("run_id") for e in events))
    owner = newest.get("run_id") if newest is not None else None
    if newest is None or owner not in ids:
        owner = events[-1].get("run_id") if events else None
    mine = [e for e in events if e.get("run_id") == owner]
    first = next((e for e in mine if e.get("kind") == "run_start"), None)
    if owner is not None and first is not None and first.get("resumed") and first.get("attempt", 1) == 1:
        mine = [dict(e, attempt=0) for e in events if e.get("run_id") is None] + mine
        ids = [i for i in ids if i is not None]
    starts = {e.get("attempt", 1): e for e in mine if e.get("kind") == "run_start"}
    kept = []
    for e in mine:
        attempt = e.get("attempt", 1)
        later = [st["from_step"] for a, st in starts.items() if a > attempt]
        if not later or _position(e, starts.get(attempt) or first) <= min(later):
            kept.append(e)
    resumes = [st for a, st in sorted(starts.items()) if st.get("resumed")]
    return kept, resumes, [i for i in ids if i != owner]


def knn_floor(events: list[dict]) -> float | None:
    """The k-NN top-1 of the network at initialisation: its own check, or as a later record repeats it."""
    for e in events:
        if e.get("kind") == "knn" and e.get("initial"):
            return e["top1"]
        floor = e.get("knn_top1_init", e.get("top1_init", -1)) if e.get("kind") in ("knn", "diagnostics") else -1
        if floor >= 0:
            return floor
    return None


def _series(events: list[dict], kind: str, x: str, y: str) -> tuple[list, list]:
    pts = [(e[x], e[y]) for e in events if e.get("kind") == kind and y in e and x in e]
    return [p[0] for p in pts], [p[1] for p in pts]


def _figures(events: list[dict], resumes: list[dict]) -> list[tuple[str, "object"]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []

    def fig(title: str):
        f, ax = plt.subplots(figsize=(6.4, 3.4), dpi=100)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        figs.append((title, f))
        return ax

    def mark_resumes(ax, per_epoch: bool = False) -> None:
        for st in resumes:
            x = st["from_epoch"] if per_epoch else st["from_step"]
            ax.axvline(x, color="grey", ls=":", lw=1)
            ax.annotate(f"attempt {st['attempt']}", (x, 1), xycoords=("data", "axes fraction"), fontsize=7,
                        color="grey", va="top", rotation=90)

    ax = fig("Loss")
    ax.plot(*_series(events, "step", "global_step", "loss"))
    mark_resumes(ax)
    ax.set_xlabel("step")
    ax = fig("Learning rate")
    ax.plot(*_series(events, "step", "global_step", "lr"))
    mark_resumes(ax)
    ax.set_xlabel("step")
    ax = fig("Throughput (images/s, all ranks)")
    ax.plot(*_series(events, "step", "global_step", "images_per_s"))
    ax2 = ax.twinx()
    xs, ys = _series(events, "step", "global_step", "data_wait_ratio")
    ax2.plot(xs, [100 * v for v in ys], color="tab:orange", alpha=0.6)
    ax2.set_ylabel("data wait %", color="tab:orange")
    mark_resumes(ax)
    ax.set_xlabel("step")
    ax = fig("k-means time per epoch (s)")
    ax.plot(*_series(events, "kmeans", "epoch", "seconds"), marker=".")
    ax.set_xlabel("epoch")
    kms = [e for e in events if e.get("kind") == "kmeans"]
    heads = sorted({h["head"] for e in kms for h in e.get("heads", [])})
    for title, key, scale in (("Empty clusters", "empty_clusters", 1), ("Cluster-size entropy / log K", "size_entropy", 1),
                              ("NMI vs previous epoch", "nmi_prev", 1)):
        ax = fig(title)
        for h in heads:
            pts = [(e["epoch"], hh[key] * scale) for e in kms for hh in e.get("heads", []) if hh["head"] == h and key in hh]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"head {h}")
        if heads:
            ax.legend(fontsize=8)
        ax.set_xlabel("epoch")
    knn = [e for e in events if e.get("kind") == "knn"]
    if knn:
        ax = fig("k-NN accuracy of the frozen trunk (%)")
        ax.plot([e["epoch"] for e in knn], [e["top1"] for e in knn], marker="o", label="top-1")
        ax.plot([e["epoch"] for e in knn], [e["top5"] for e in knn], marker="o", label="top-5")
        init = knn_floor(events)
        if init is not None:
            ax.axhline(init, color="grey", ls="--", label="top-1 at initialisation")
        ax.legend(fontsize=8)
        ax.set_xlabel("epoch")
    diags = [e for e in events if e.get("kind") == "diagnostics"]
    if diags:
        ax = fig("Representation: mean pairwise cosine (1 = collapsed)")
        for key, label in (("trunk", "trunk features"), ("embedding", "head embeddings")):
            ax.plot([e["epoch"] for e in diags], [e[key]["mean_cosine"] for e in diags], marker=".", label=label)
        ax.legend(fontsize=8)
        ax.set_xlabel("epoch")
        ax = fig("Representation: effective rank")
        for key, label in (("trunk", "trunk features"), ("embedding", "head embeddings")):
            ax.plot([e["epoch"] for e in diags], [e[key]["effective_rank"] for e in diags], marker=".", label=label)
        ax.legend(fontsize=8)
        ax.set_xlabel("epoch")
        ax = fig("Weight change per epoch (relative, per layer)")
        for layer in diags[-1]["weight_change"]:
            pts = [(e["epoch"], e["weight_change"][layer]["per_epoch"]) for e in diags if layer in e["weight_change"]]
            ax.semilogy([p[0] for p in pts], [max(p[1], 1e-9) for p in pts], marker=".", label=layer)
        ax.legend(fontsize=7)
        ax.set_xlabel("epoch")
    return figs


def png_name(i: int, title: str) -> str:
    """The file of the i-th figure: its title before any " (", lower case, each run of characters other than
    letters, digits and '-' as one '_' (no ':' or '/', which some file systems and URLs refuse)."""
    return f"{i:02d}_{re.sub(r'[^a-z0-9-]+', '_', title.split(' (')[0].lower()).strip('_')}.png"


def render(run: str, out_dir: str) -> str:
    """Write ``out_dir/*.png`` and ``out_dir/report.html``; return the HTML path."""
    import matplotlib.pyplot as plt

    from dcv2_k8s.checkpoint import CheckpointManager

    events, resumes, others = select_run(load_events(run), CheckpointManager(run).latest())
    if not any(e.get("kind") == "step" for e in events):
        raise ValueError(f"{run}: the metrics log has no training steps yet")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = [e for e in events if e.get("kind") == "step"]
    knn = [e for e in events if e.get("kind") == "knn"]
    last = steps[-1]
    summary = {}
    if last.get("run_id"):
        summary["run"] = last["run_id"]
        at = ", ".join(str(st["from_step"]) for st in resumes)
        summary["attempts"] = f"{1 + len(resumes)}" + (f" (resumed at step{'s' * (len(resumes) > 1)} {at})"
                                                       if resumes else "")
    if others:
        summary["other runs in this log (not drawn)"] = ", ".join(str(i or "without an id") for i in others)
    summary |= {"epochs logged": last["epoch"] + 1, "steps": last["global_step"],
                "last loss": f"{last['loss']:.4f}",
                "median images/s": f"{sorted(s['images_per_s'] for s in steps)[len(steps) // 2]:.1f}"}
    if knn:
        summary["last k-NN top-1"] = f"{knn[-1]['top1']:.2f} %"
    init = knn_floor(events)
    if init is not None:
        summary["k-NN top-1 at initialisation"] = f"{init:.2f} %"
        if knn and not knn[-1].get("initial"):
            summary["k-NN gain over initialisation"] = f"{knn[-1]['top1'] - init:+.2f} points"
    parts = [f"<h1>DeepClusterV2 run report</h1><p>{html.escape(run)}</p><table>"]
    parts += [f"<tr><th align=left>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items()]
    parts.append("</table>")
    if any(e.get("kind") == "knn" and e.get("not_beating_init") for e in events):
        parts.append("<p><b>Training is not beating the network it started from</b>: its k-NN top-1 stayed within "
                     "a few points of the network at initialisation. On this data the input view alone accounts for "
                     "the accuracy (see 'What training adds' in docs/evaluation.md).</p>")
    diags = [e for e in events if e.get("kind") == "diagnostics"]
    warned = [(e["epoch"], w) for e in diags for w in e.get("warnings", [])]
    if diags:
        parts.append("<h2>Collapse check</h2>")
        if warned:
            parts.append("<p><b>The run raised collapse warnings</b> (see docs/troubleshooting.md):</p><ul>")
            parts += [f"<li>epoch {ep}: {html.escape(w)}</li>" for ep, w in warned]
            parts.append("</ul>")
        else:
            parts.append(f"<p>No collapse warning in {len(diags)} checks (last: trunk mean cosine "
                         f"{diags[-1]['trunk']['mean_cosine']:.3f}, effective rank "
                         f"{diags[-1]['trunk']['effective_rank']:.1f}).</p>")
    for i, (title, f) in enumerate(_figures(events, resumes)):
        png = out / png_name(i, title)
        f.tight_layout()
        buf = io.BytesIO()
        f.savefig(buf, format="png")
        plt.close(f)
        png.write_bytes(buf.getvalue())
        data = base64.b64encode(buf.getvalue()).decode()
        parts.append(f"<h3>{html.escape(title)}</h3><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>")
    page = out / "report.html"
    page.write_text("<!doctype html><html><head><meta charset='utf-8'><title>DCv2 report</title></head><body>"
                    + "\n".join(parts) + "</body></html>")
    return os.fspath(page)
