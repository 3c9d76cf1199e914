"""DCv2 on small image sets it was not tuned on: weighted k-NN top-1 of the frozen trunk, per data kind, for the
network at random initialisation, after the demo preset and after the small-scale preset.

Every number comes from the user-facing commands, run as subprocesses exactly as printed in the results:
``dcv2 data synth`` (the data), ``dcv2 knn`` (random init, and each trained checkpoint), ``dcv2 train`` (2 CPU
processes). Wall time of each training run is recorded. The ``digits*`` kinds are real handwriting that nobody here
generated or tuned on (``heldout_digits.py``, needs scikit-learn). Random init is scored twice: with each preset's
own view (its whole-image preprocessing and input normalisation: what the training starts from) and with a plain
view (the same crops without them), so that the table separates what the view does from what training adds.

    python benchmarks/small_scale.py [--kinds glyphs naturals icons] [--presets small_scale demo]
                                     [--work /tmp/dcv2-small] [--out benchmarks/results/small_scale_cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import machine, write_results  # noqa: E402
import heldout_digits  # noqa: E402

PRESETS = {"small_scale": "pretrain/deepcluster_v2/deepclusterv2_small_scale",
           "demo": "pretrain/deepcluster_v2/deepclusterv2_demo_cpu"}
# the data kinds and their image sizes (glyphs as small grey images, the others at the demo's 64 px)
# written into each run's directory after its training: what --score-only reports as the run's command and time
RECORD = "benchmark_run.json"
KINDS = {"glyphs": 48, "naturals": 64, "icons": 64, "textures": 64, "shapes": 64,
         "digits": 48, "digits_placed": 64, "digits_cluttered": 64}
# the plain view: a preset's crops and normalisation without its whole-image preprocessing and input normalisation
PLAIN_VIEW = ["config.MODEL.TRUNK.INPUT_NORM=none",
              "config.DATA.TRAIN.TRANSFORMS=[{name: ImgPilToMultiCrop, total_num_crops: 4, size_crops: [32, 16], "
              "num_crops: [2, 2], crop_scales: [[0.7, 1], [0.35, 0.7]]}, {name: ToTensor}, "
              "{name: Normalize, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}]"]


def dcv2(args: list[str], log: str | None = None, env: dict | None = None) -> subprocess.Popen | str:
    """Run ``dcv2 ARGS``: with ``log``, start it in the background (output to ``log``) and return the process;
    without, wait and return its stdout."""
    cmd = [sys.executable, "-m", "dcv2_k8s", *args]
    print("$ dcv2 " + " ".join(shlex.quote(a) for a in args), flush=True)
    if log:
        with open(log, "w") as f:
            return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, env=env)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"dcv2 {args[0]} failed (exit {p.returncode}): {p.stderr[-2000:]}")
    return p.stdout


def knn(data: str, extra: list[str]) -> dict:
    out = dcv2(["knn", "--train", f"{data}/train", "--val", f"{data}/val", "--workers", "0", *extra])
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", nargs="+", default=["glyphs", "naturals", "icons"], choices=sorted(KINDS))
    ap.add_argument("--presets", nargs="+", default=["small_scale", "demo"], choices=sorted(PRESETS))
    ap.add_argument("--train-per-class", type=int, default=140)
    ap.add_argument("--val-per-class", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0, help="data seed of dcv2 data synth")
    ap.add_argument("--jobs", type=int, default=1,
                    help="training runs at once (each gets cpus / jobs threads, one process each: the demo preset "
                         "then runs as 1 process x batch 64, the same global batch and BN batch as its 2 x 32)")
    ap.add_argument("--work", default="/tmp/dcv2-small", help="data, checkpoints and logs")
    ap.add_argument("--out", default="benchmarks/results/small_scale_cpu")
    ap.add_argument("--set", action="append", default=[], metavar="config.KEY=VALUE",
                    help="extra override for every training run (e.g. to try a change)")
    ap.add_argument("--score-only", action="store_true",
                    help="train nothing: score the runs already in --work (a run stopped early is scored at its "
                         "last committed checkpoint, and the table says at which epoch)")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    result = {"machine": machine(), "runs": [], "kinds": a.kinds, "presets": a.presets, "jobs": a.jobs}
    entries = {}
    for kind in a.kinds:  # the data and the random-init floor of each preset's network
        data = os.path.join(a.work, kind)
        if kind in heldout_digits.KINDS:  # real handwriting: all of it (about 140 train + 40 val per class)
            if not os.path.isdir(os.path.join(data, "val")):
                print(f"held-out digits {kind}: {heldout_digits.write(data, kind, KINDS[kind], seed=a.seed)}")
        else:
            dcv2(["data", "synth", data, "--kind", kind, "--size", str(KINDS[kind]), "--seed", str(a.seed),
                  "--train-per-class", str(a.train_per_class), "--val-per-class", str(a.val_per_class)])
        entries[kind] = {"kind": kind, "size": KINDS[kind], "data": data, "real": kind in heldout_digits.KINDS,
                         "random_init": {n: knn(data, [f"config={PRESETS[n]}"])["top1"] for n in a.presets},
                         "random_init_plain_view": knn(data, [f"config={PRESETS['small_scale']}", *PLAIN_VIEW])["top1"]}
    queue = [] if a.score_only else [(kind, name) for kind in a.kinds for name in a.presets]
    if a.score_only:
        for kind in a.kinds:
            for name in a.presets:
                run_dir = os.path.join(a.work, f"run_{kind}_{name}")
                if os.path.exists(os.path.join(run_dir, "latest.json")):
                    rec = {"args": None, "seconds": 0.0}
                    if os.path.exists(os.path.join(run_dir, RECORD)):  # the command and wall time of its training
                        with open(os.path.join(run_dir, RECORD)) as f:
                            rec = json.load(f)
                    entries[kind][name] = score(entries[kind]["data"], run_dir, rec["args"], rec["seconds"])
                    entries[kind][name].update(threads=rec.get("threads"), jobs=rec.get("jobs"))
    running: dict = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // a.jobs)))
    while queue or running:
        while queue and len(running) < a.jobs:
            kind, name = queue.pop(0)
            data, run_dir = entries[kind]["data"], os.path.join(a.work, f"run_{kind}_{name}")
            subprocess.run(["rm", "-rf", run_dir], check=True)
            args = ["train", f"config={PRESETS[name]}", f"config.DATA.TRAIN.DATA_PATHS=[{data}/train]",
                    f"config.DATA.TEST.DATA_PATHS=[{data}/val]", f"config.CHECKPOINT.DIR={run_dir}",
                    "config.METRICS.ENABLED=false", *a.set]
            if a.jobs > 1:
                args += ["config.DISTRIBUTED.NUM_PROC_PER_NODE=1"]
                if name == "demo":
                    args += ["config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=64"]
            running[(kind, name)] = (dcv2(args, log=run_dir + ".log", env=env), time.time(), args, run_dir)
        time.sleep(5)
        for key, (proc, t0, args, run_dir) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[key]
            kind, name = key
            if proc.returncode:
                raise SystemExit(f"{kind} {name}: dcv2 train failed (exit {proc.returncode}); see {run_dir}.log")
            seconds = time.time() - t0
            with open(os.path.join(run_dir, RECORD), "w") as f:
                json.dump({"args": args, "seconds": seconds, "threads": env["OMP_NUM_THREADS"], "jobs": a.jobs}, f)
            entries[kind][name] = score(entries[kind]["data"], run_dir, args, seconds)
            entries[kind][name].update(threads=env["OMP_NUM_THREADS"], jobs=a.jobs)
            base, trained = entries[kind]["random_init"][name], entries[kind][name]["knn_top1"]
            print(f"{kind} {name}: random init {base:.1f} %, trained {trained:.1f} % ({trained - base:+.1f}; "
                  f"{entries[kind][name]['minutes']} min)", flush=True)
    rows = []
    for kind in a.kinds:
        e = entries[kind]
        result["runs"].append(e)
        row = [kind + (" (real, held out)" if e.get("real") else " (generated)"),
               f"{e['random_init_plain_view']:.1f}" if "random_init_plain_view" in e else "not measured",
               " / ".join(f"{e['random_init'][n]:.1f}" for n in a.presets)]
        for name in a.presets:
            if name not in e:
                row += ["not run", "", ""]
                continue
            r = e[name]
            margin = r["knn_top1"] - e["random_init"][name]
            done = "" if r["epoch"] == r["epochs"] else f", stopped at epoch {r['epoch']} of {r['epochs']}"
            row += [f"{r['knn_top1']:.1f} ({margin:+.1f}{done})", minutes(r), str(r["collapse_warnings"])]
        rows.append(row)
    write_results(a.out, result, rows, ["data kind", "random init, plain view: k-NN top-1 %",
                                        "random init, preset's view (" + " / ".join(a.presets) + ")"] +
                  [c for n in a.presets for c in (f"{n}: k-NN top-1 % (vs random init)", f"{n}: minutes",
                                                  f"{n}: collapse warnings")],
                  "DCv2 on held-out small image sets: weighted k-NN top-1 (k=20) of the frozen trunk on the val split")
    return 0


def minutes(run: dict) -> str:
    """Wall minutes of a training run and how many ran at once (each run's threads: cores / runs at once)."""
    if not run.get("minutes"):
        return "not recorded"
    return f"{run['minutes']} ({run.get('jobs') or '?'} at once, {run.get('threads') or '?'} threads)"


def score(data: str, run_dir: str, args: list[str] | None, seconds: float) -> dict:
    """k-NN of a run's last committed checkpoint, with its k-NN curve and collapse warnings from metrics.jsonl."""
    trained = knn(data, ["--checkpoint", run_dir])["top1"]
    events = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    warnings = [w for e in events if e["kind"] == "diagnostics" for w in e.get("warnings", [])]
    import yaml

    from dcv2_k8s.weights import read_file

    state = read_file(run_dir)  # the newest committed checkpoint
    cfg_epochs = yaml.safe_load(state["config_yaml"])["config"]["OPTIMIZER"]["num_epochs"]
    return {"knn_top1": trained, "minutes": round(seconds / 60, 1) if seconds else None,
            "collapse_warnings": len(warnings), "epoch": state["train_state"]["epoch"], "epochs": cfg_epochs,
            "command": "dcv2 " + " ".join(args) if args else None,
            "knn_curve": [(e["epoch"], e["top1"]) for e in events if e["kind"] == "knn"]}


if __name__ == "__main__":
    sys.exit(main())
