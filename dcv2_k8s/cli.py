"""``dcv2``: one command, plain subcommands over the library.

User mistakes (configuration, paths, environment) print one line each, ``dcv2: error: ...``, and exit 2
before any process group forms.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dcv2_k8s import exitcodes
from dcv2_k8s.plural import count


def _fail(lines) -> int:
    for line in lines if isinstance(lines, (list, tuple)) else [lines]:
        print(f"dcv2: error: {line}", file=sys.stderr)
    return exitcodes.USAGE


def _note(resolved) -> None:
    for note in resolved.notes:
        print(f"dcv2: note: {note}", file=sys.stderr)


def _resolve(args, for_training: bool = True):
    """The run's config: resolved once from the tokens (with the launcher's world size), or, in a process that a
    launcher started, loaded as the parent resolved it (``--resolved FILE``)."""
    from dcv2_k8s import distributed as D
    from dcv2_k8s.config import load_resolved, resolve

    if getattr(args, "resolved", None):
        return load_resolved(args.resolved)
    resolved = resolve(args.tokens, *D.launcher_world(), for_training=for_training)
    _note(resolved)
    return resolved


def _spawn(resolved, command: str, nproc: int, max_restarts: int = 0) -> int:
    """Start ``nproc`` processes of ``dcv2 COMMAND --resolved FILE`` on this node (torchrun): they read the config
    this process resolved, not the tokens."""
    import shutil
    import tempfile

    from dcv2_k8s import distributed as D
    from dcv2_k8s.config import write_resolved

    tmp = tempfile.mkdtemp(prefix="dcv2-run-")
    try:
        path = write_resolved(resolved, os.path.join(tmp, "resolved.yaml"))
        return D.spawn_local(nproc, [command, "--resolved", path], max_restarts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _machine_problems(cfg) -> tuple[list[str], int]:
    """What the config asks of this machine and the launch that it cannot give: CUDA, devices per process, nodes
    without a launcher. Returns the problems and the world size the suggested fixes lead to."""
    import torch

    from dcv2_k8s import distributed as D

    problems = []
    dist_cfg, device = cfg.DISTRIBUTED, cfg.MACHINE.DEVICE
    cuda = torch.cuda.is_available()
    wants_gpu = device in ("gpu", "cuda")
    if wants_gpu and not cuda:
        fix = "config.MACHINE.DEVICE=cpu" + (" config.DISTRIBUTED.BACKEND=gloo" if dist_cfg.BACKEND == "nccl" else "")
        problems.append(f"config.MACHINE.DEVICE={device} but this machine has no CUDA device; set {fix}")
    elif dist_cfg.BACKEND == "nccl" and not cuda and device == "auto":
        problems.append("config.DISTRIBUTED.BACKEND=nccl runs on CUDA devices only and this machine has none; set "
                        "config.DISTRIBUTED.BACKEND=gloo")
    world = dist_cfg.world_size
    if not D.launched() and not D.operator_env():
        if dist_cfg.NUM_NODES > 1:
            problems.append(f"config.DISTRIBUTED.NUM_NODES={dist_cfg.NUM_NODES} needs a launcher on every node "
                            "(torchrun or a PyTorchJob); on one machine set config.DISTRIBUTED.NUM_NODES=1")
            world = dist_cfg.NUM_PROC_PER_NODE
        if cuda and (wants_gpu or device == "auto") and dist_cfg.BACKEND in ("nccl", "auto"):
            gpus = torch.cuda.device_count()
            if dist_cfg.NUM_PROC_PER_NODE > gpus:  # nccl refuses two ranks on one device
                problems.append(f"config.DISTRIBUTED.NUM_PROC_PER_NODE={dist_cfg.NUM_PROC_PER_NODE} but this machine "
                                f"has {count(gpus, 'CUDA device')} (nccl runs one process per device); set "
                                f"config.DISTRIBUTED.NUM_PROC_PER_NODE={gpus}")
                world = world // dist_cfg.NUM_PROC_PER_NODE * gpus
    return problems, world


def preflight(cfg) -> None:
    """What the run needs from this machine, checked before any process starts: the device and the launch, the
    training data's location (and, when local, whether its size fits the config), then the checkpoint store
    (reachable, credentials). Every problem found is reported at once, one line each, each naming its cause and
    the keys that fix it."""
    from dcv2_k8s.config import ConfigError
    from dcv2_k8s.config.derive import check_dataset
    from dcv2_k8s.data.dataset import DatasetRoot, check_split_dir, scan_image_folder
    from dcv2_k8s.storage import StorageError, open_storage

    problems, world = _machine_problems(cfg)
    paths = cfg.DATA.TRAIN.DATA_PATHS
    data_ok = bool(paths)
    if not paths:
        problems.append("config.DATA.TRAIN.DATA_PATHS is empty; set config.DATA.TRAIN.DATA_PATHS=[/path/to/train] "
                        "(an ImageFolder directory, or s3://bucket/prefix)")
    elif "://" not in paths[0] and not os.path.isdir(paths[0]):
        what = "is not a directory" if os.path.exists(paths[0]) else "does not exist"
        problems.append(f"config.DATA.TRAIN.DATA_PATHS: {paths[0]} {what} (expected an ImageFolder tree "
                        "CLASS/IMAGE, or s3://bucket/prefix)")
        data_ok = False
    for key, split in (("DATA.TRAIN.DATA_PATHS", paths if data_ok else []),
                       ("DATA.TEST.DATA_PATHS", cfg.DATA.TEST.DATA_PATHS)):
        try:  # one split each (the k-NN monitor's queries too), not a dataset root
            if split and "://" not in split[0]:
                check_split_dir(split[0], "train" if key.startswith("DATA.TRAIN") else "val")
        except DatasetRoot as e:
            problems.append(f"config.{key}: {e}")
            data_ok = data_ok and key != "DATA.TRAIN.DATA_PATHS"
    if data_ok and "://" not in paths[0]:  # local data: its size is known now (s3:// data is checked once staged)
        _, samples = scan_image_folder(paths[0])
        limit = cfg.DATA.TRAIN.DATA_LIMIT
        problems += check_dataset(cfg, min(len(samples), limit) if limit > 0 else len(samples), world)
    try:
        open_storage(cfg.CHECKPOINT.DIR).check()
    except StorageError as e:
        problems.append(str(e))
    if problems:
        raise ConfigError(problems)


# ------------------------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    from dcv2_k8s import distributed as D
    from dcv2_k8s.config import ConfigError
    from dcv2_k8s.storage import StorageError

    try:
        resolved = _resolve(args)
        if not args.resolved:
            preflight(resolved.cfg)
    except (ConfigError, StorageError, FileNotFoundError) as e:
        return _fail(e.lines if isinstance(e, ConfigError) else str(e))
    dist_cfg = resolved.cfg.DISTRIBUTED
    if D.operator_env():  # a pod: this process stays the container's main process, torchrun runs the ranks
        return _spawn(resolved, "train", dist_cfg.NUM_PROC_PER_NODE, dist_cfg.MAX_RESTARTS)
    if not D.launched():
        if dist_cfg.NUM_PROC_PER_NODE > 1:  # (NUM_NODES > 1 without a launcher is refused by preflight)
            return _spawn(resolved, "train", dist_cfg.NUM_PROC_PER_NODE, dist_cfg.MAX_RESTARTS)
    from dcv2_k8s.engine import Preempted, TrainingError, train

    try:
        train(resolved)
    except ConfigError as e:  # what the data's size means for the config, known once the data is here
        return _fail(e.lines)
    except Preempted:
        return exitcodes.PREEMPTED
    except (TrainingError, StorageError) as e:
        code = exitcodes.classify(e)
        print(f"dcv2: error: {e}" + (" (retryable: the job restarts and resumes)" if exitcodes.retryable(code)
                                     else ""), file=sys.stderr)
        return code
    return exitcodes.OK


def cmd_stage(args) -> int:
    from dcv2_k8s.data.layout import verify
    from dcv2_k8s.data.stage import Interrupted, StageOptions, stage
    from dcv2_k8s.storage import StorageError

    if args.verify:
        problems = verify(args.dest, checksum=not args.no_checksum)
        for line in problems[:50]:
            print(line)
        if len(problems) > 50:
            print(f"... and {len(problems) - 50} more")
        print(f"{args.dest}: {'intact' if not problems else f'{len(problems)} differences'}")
        return 0 if not problems else 1
    if not args.src:
        return _fail("dcv2 stage SRC DEST (or dcv2 stage --verify DEST)")
    exporter = None
    if args.metrics_port:
        from dcv2_k8s.metrics import StageMetrics

        exporter = StageMetrics(args.src, args.metrics_port)
    try:
        m = stage(args.src, args.dest, StageOptions(
            workers=args.workers, progress=sys.stderr.isatty() or args.progress, checksum=not args.no_checksum,
            labels=args.labels, class_names=args.class_names, replace=args.replace, log_every=args.log_every,
            on_event=exporter))
    except Interrupted as e:
        print(f"dcv2: {e}", file=sys.stderr)
        return 128 + e.signum
    except StorageError as e:
        if e.transient:  # the store is unreachable or throttling past the retries: retry later, as training does
            print(f"dcv2: error: {e} (retryable: staging again resumes)", file=sys.stderr)
            return exitcodes.RETRYABLE
        return _fail(str(e))
    finally:
        if exporter is not None:
            exporter.close()
    print(json.dumps({k: m[k] for k in ("source", "num_files", "transferred", "skipped", "repaired", "removed",
                                        "bytes")} | {"classes": len(m["classes"])}))
    return 0


def cmd_s3_serve(args) -> int:
    from dcv2_k8s.s3server import serve

    return serve(args.host, args.port, args.bucket)


def cmd_linear_eval(args) -> int:
    from dcv2_k8s import distributed as D
    from dcv2_k8s.config import ConfigError, resolve
    from dcv2_k8s.data.dataset import SplitMismatch, check_splits
    from dcv2_k8s.eval.linear import linear_eval, result_path
    from dcv2_k8s.storage import StorageError
    from dcv2_k8s.weights import WeightsError, read_file, split_weights, trunk_tokens

    try:
        r = _resolve(args, for_training=False)
        if not args.resolved:
            for key, paths in (("DATA.TRAIN.DATA_PATHS", r.cfg.DATA.TRAIN.DATA_PATHS),
                               ("DATA.TEST.DATA_PATHS", r.cfg.DATA.TEST.DATA_PATHS)):
                if not paths:
                    raise ConfigError([f"config.{key} is empty; set it to [DIR] (an ImageFolder with class "
                                       "directories)"])
                if not paths[0].startswith("s3://") and not os.path.isdir(paths[0]):
                    raise ConfigError([f"config.{key}: {paths[0]} does not exist"])
            weights = r.cfg.MODEL.WEIGHTS_INIT.PARAMS_FILE
            if weights and not weights.startswith("s3://") and not os.path.exists(weights):
                raise ConfigError([f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE: {weights} does not exist"])
            train_dir, val_dir = r.cfg.DATA.TRAIN.DATA_PATHS[0], r.cfg.DATA.TEST.DATA_PATHS[0]
            if not train_dir.startswith("s3://") and not val_dir.startswith("s3://"):
                check_splits(train_dir, val_dir)  # s3:// splits are checked once staged
            # resolved once more, for every process: our checkpoint's trunk unless set here, and where to write
            obj = read_file(weights) if weights else None
            arch = trunk_tokens(obj) if obj is not None and split_weights(obj)[0] == "dcv2" else []
            out = result_path(r.cfg, r.cli_keys | r.file_keys)
            r = resolve([*arch, *args.tokens, f"config.LINEAR_EVAL.OUTPUT={out}"], *D.launcher_world(),
                        for_training=False)
    except ConfigError as e:
        return _fail(e.lines)
    except (SplitMismatch, FileNotFoundError, WeightsError, StorageError) as e:
        return _fail(str(e))
    out = r.cfg.LINEAR_EVAL.OUTPUT
    wrote = f"dcv2: wrote {out.rsplit('/', 1)[-1]} to {out.rsplit('/', 1)[0] if '/' in out else '.'}"
    if D.operator_env() or (not D.launched() and r.cfg.DISTRIBUTED.NUM_PROC_PER_NODE > 1):
        code = _spawn(r, "linear-eval", r.cfg.DISTRIBUTED.NUM_PROC_PER_NODE)
        if code == 0:
            print(wrote, file=sys.stderr)
        return code
    try:
        res = linear_eval(r)
    except (WeightsError, StorageError, FileNotFoundError, SplitMismatch) as e:
        return _fail(str(e))
    if D.env_info().is_main:
        print(json.dumps({k: v for k, v in res.items() if k != "history"}))
        if not args.resolved:
            print(wrote, file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from dcv2_k8s.checkpoint import to_bytes
    from dcv2_k8s.config import ConfigError, config_from_checkpoint
    from dcv2_k8s.storage import StorageError, write_bytes
    from dcv2_k8s.weights import WeightsError, export_swav, export_torchvision, input_view, read_file, split_weights

    try:
        obj = read_file(args.checkpoint)
        layout = split_weights(obj)[0]
        cfg = config_from_checkpoint(obj).cfg if layout == "dcv2" else None  # ours carry their config: parse once
        view = input_view(cfg) if cfg is not None else {}
        if args.format == "torchvision":
            out = export_torchvision(obj, cfg.MODEL.TRUNK.RESNETS.DEPTH if cfg is not None else args.depth)
        else:
            from dcv2_k8s.model.head import build_head

            out = export_swav(obj, build_head(cfg.MODEL.HEAD) if cfg is not None else None)
        data = to_bytes(out)
        write_bytes(args.out, data)
    except (WeightsError, StorageError, ConfigError) as e:
        return _fail(str(e) if not isinstance(e, ConfigError) else e.lines)
    if view:
        print(f"dcv2: note: these weights were trained on inputs made by {json.dumps(view)}; apply the same "
              "(dcv2_k8s.model.resnet.standardize_input, dcv2_k8s.data.transforms.CropToContent) wherever you "
              "use them", file=sys.stderr)
    print(json.dumps({"from": args.checkpoint, "layout": layout, "format": args.format, "out": args.out,
                      "tensors": len(out), "bytes": len(data), **view}))
    return 0


def cmd_clusters(args) -> int:
    from dcv2_k8s.data.dataset import check_split_dir
    from dcv2_k8s.eval.clusters import run_from_checkpoint
    from dcv2_k8s.storage import StorageError
    from dcv2_k8s.weights import WeightsError

    if not os.path.isdir(args.data_dir):
        return _fail(f"{args.data_dir}: no such directory (expected an ImageFolder tree)")
    try:
        check_split_dir(args.data_dir)  # before the checkpoint is read: one split, not a dataset root
        stats = run_from_checkpoint(args.checkpoint, args.data_dir, args.out, args.workers, sys.stderr.isatty())
    except (WeightsError, StorageError, FileNotFoundError) as e:
        return _fail(str(e))
    for h in stats["heads"]:
        print(f"head {h['head']}: {count(h['clusters'], 'cluster')}, {h['empty']} empty, largest "
              f"{count(h['largest'], 'image')}, "
              f"size entropy {h['size_entropy']:.3f}" +
              (f", NMI {h['nmi']:.3f}, ARI {h['ari']:.3f} against the class folders" if "nmi" in h else ""))
    print(f"{count(stats['images'], 'image')} assigned; wrote assignments.csv, cluster_sizes.json, "
          f"contact_sheet_head*.png to {args.out}")
    return 0


def cmd_extract(args) -> int:
    from dcv2_k8s import distributed as D
    from dcv2_k8s.config import ConfigError
    from dcv2_k8s.eval.extract import load_network, open_split, run_extract
    from dcv2_k8s.storage import StorageError, open_storage
    from dcv2_k8s.weights import WeightsError

    if not os.path.isdir(args.data_dir):
        return _fail(f"{args.data_dir}: no such directory (expected an ImageFolder split DIR/CLASS/IMAGE, or a "
                     "directory of images)")
    if args.nproc < 1:
        return _fail(f"--nproc {args.nproc}: give 1 or more processes")
    if args.device == "gpu":
        import torch

        if not torch.cuda.is_available():
            return _fail("--device gpu (config.MACHINE.DEVICE=gpu): no CUDA device is visible; use cpu or auto")
    main_rank = D.env_info().is_main
    try:
        open_split(args.data_dir)  # before the weights are read: a dataset root, a directory without images
        if main_rank:  # the writer (and the command that starts the ranks): before any work
            if "://" not in args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
                return _fail(f"{args.out}: exists and is not a directory (OUT is where the .npy files go)")
            open_storage(args.out).check()  # s3://: reachable, credentials; local: can be made and written
        net = load_network(args.checkpoint or "", args.tokens, args.head)
    except ConfigError as e:
        return _fail(e.lines)
    except (WeightsError, StorageError, FileNotFoundError) as e:
        return _fail(str(e))
    if main_rank:
        for note in net.notes:
            if "config.OPTIMIZER." not in note:  # how training would derive its schedule: not used here
                print(f"dcv2: note: {note}", file=sys.stderr)
    if D.operator_env() or (not D.launched() and args.nproc > 1):  # N ranks of this command on this node (torchrun)
        argv = ["--size", str(args.size), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                "--device", args.device, *(["--checkpoint", args.checkpoint] if args.checkpoint else []),
                *(["--head"] if args.head else []), *(["--split", args.split] if args.split else []),
                args.data_dir, args.out, *args.tokens]
        code = D.spawn_local(args.nproc, ["extract", *argv])
        if code == 0:
            print(f"dcv2: wrote features.npy, labels.npy, {'head.npy, ' if args.head else ''}paths.txt, meta.json "
                  f"to {args.out}", file=sys.stderr)
        return code
    try:
        meta = run_extract(net, args.data_dir, args.out, args.size, args.batch_size, args.workers, args.device,
                           args.split)
    except StorageError as e:
        if e.transient:
            print(f"dcv2: error: {e} (retryable: run it again)", file=sys.stderr)
            return exitcodes.RETRYABLE
        if getattr(e, "code", exitcodes.USAGE) != exitcodes.USAGE:  # OutputError: an OSError of the filesystem
            print(f"dcv2: error: {e}", file=sys.stderr)
            return e.code
        return _fail(str(e))
    except FileNotFoundError as e:
        return _fail(str(e))
    if meta is not None:
        print(json.dumps({k: meta[k] for k in ("split", "count", "feature_dim", "labelled", "num_classes", "weights",
                                               "layout", "resolution", "world_size", "seconds")}
                         | {"head_dim": meta["head"]["dim"] if meta["head"] else None, "out": args.out}))
        if not D.launcher_reports():  # a rank this command spawned: its parent says it once
            print(f"dcv2: wrote {', '.join(meta['files'])} to {args.out}", file=sys.stderr)
    return 0


ENGINES = ("train", "extract_features")


def engine_main(argv: list[str]) -> int:
    """VISSL's ``tools/run_distributed_engines.py TOKENS...``: ``engine_name=train`` (VISSL's default) is
    ``dcv2 train TOKENS...``; ``engine_name=extract_features`` extracts the trunk's features (the head's too with
    ``config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_TRUNK_AND_HEAD=true``) of ``DATA.TRAIN.DATA_PATHS`` and
    ``DATA.TEST.DATA_PATHS`` with the weights of ``MODEL.WEIGHTS_INIT.PARAMS_FILE`` into
    ``EXTRACT_FEATURES.OUTPUT_DIR/{train,test}/`` (``CHECKPOINT.DIR`` when empty): ``dcv2 extract`` per split.
    ``engine_name`` is a top-level key, as in VISSL: on the command line, or in the ``config=`` file beside
    ``config:``."""
    from dcv2_k8s.config import ConfigError

    engine = None
    tokens = []
    for tok in argv:
        if tok.startswith(("engine_name=", "+engine_name=")):
            engine = tok.split("=", 1)[1]
        else:
            tokens.append(tok)
    if engine is None:  # a VISSL file names its engine beside `config:` (feature_extraction/*.yaml)
        base = next((t.split("=", 1)[1] for t in tokens if t.startswith("config=")), None)
        if base is not None:
            from dcv2_k8s.config.loader import _read_yaml, find_config_file

            try:
                engine = _read_yaml(find_config_file(base))[1].get("engine_name")
            except ConfigError:
                pass  # dcv2 train reports it
    engine = engine or "train"
    if engine == "train":
        return main(["train", *tokens])
    if engine != "extract_features":
        return _fail(f"engine_name={engine}: dcv2 runs the engines {' and '.join(ENGINES)}")
    return _vissl_extract(tokens)


def _vissl_extract(tokens: list[str]) -> int:
    """VISSL's extract_features engine: ``dcv2 extract`` for each split the config names."""
    from dcv2_k8s import distributed as D
    from dcv2_k8s.config import ConfigError, resolve
    from dcv2_k8s.storage import StorageError, open_storage

    head = _eval_trunk_and_head(tokens)
    try:
        cfg = resolve(tokens, *D.launcher_world(), for_training=False).cfg
        splits = [(name, paths[0]) for name, paths in (("train", cfg.DATA.TRAIN.DATA_PATHS),
                                                       ("test", cfg.DATA.TEST.DATA_PATHS)) if paths]
        if not splits:
            raise ConfigError(["engine_name=extract_features: no split to extract; set "
                               "config.DATA.TRAIN.DATA_PATHS=[DIR] and/or config.DATA.TEST.DATA_PATHS=[DIR]"])
        store = open_storage(cfg.EXTRACT_FEATURES.OUTPUT_DIR or cfg.CHECKPOINT.DIR)
    except ConfigError as e:
        return _fail(e.lines)
    except StorageError as e:
        return _fail(str(e))
    weights = cfg.MODEL.WEIGHTS_INIT.PARAMS_FILE
    for name, data_dir in splits:
        batch = (cfg.DATA.TRAIN if name == "train" else cfg.DATA.TEST).BATCHSIZE_PER_REPLICA
        code = main(["extract", "--split", name, "--nproc", str(cfg.DISTRIBUTED.NUM_PROC_PER_NODE),
                     "--device", {"cuda": "gpu"}.get(cfg.MACHINE.DEVICE.lower(), cfg.MACHINE.DEVICE.lower()),
                     "--batch-size", str(batch),
                     "--workers", str(cfg.DATA.NUM_DATALOADER_WORKERS),
                     *(["--checkpoint", weights] if weights else []), *(["--head"] if head else []),
                     data_dir, store.join(name), *tokens])
        if code != exitcodes.OK:
            return code
    return exitcodes.OK


def _eval_trunk_and_head(tokens: list[str]) -> bool:
    """VISSL's ``config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_TRUNK_AND_HEAD``: the command line's (the last one), else
    the ``config=`` files' (dropped by the config loader, so read here, as ``engine_name`` is)."""
    from dcv2_k8s.config import ConfigError
    from dcv2_k8s.config.loader import _read_yaml, find_config_file

    key = "config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_TRUNK_AND_HEAD"
    value = None
    for t in tokens:
        if t.split("=", 1)[0].lstrip("+") == key:
            value = t.split("=", 1)[1]
    if value is None:
        for base in (t.split("=", 1)[1] for t in tokens if t.startswith("config=")):
            try:
                node = _read_yaml(find_config_file(base))[0]
            except ConfigError:
                continue  # resolve() reports it
            for part in ("MODEL", "FEATURE_EVAL_SETTINGS", "EVAL_TRUNK_AND_HEAD"):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                value = node
    return str(value).strip().lower() in ("true", "1", "yes")


def cmd_config_show(args) -> int:
    from dcv2_k8s import distributed as D
    from dcv2_k8s.config import ConfigError, resolve

    try:
        r = resolve(args.tokens, *D.launcher_world())
    except ConfigError as e:
        return _fail(e.lines)
    for note in r.notes:
        print(f"# note: {note}", file=sys.stderr)
    sys.stdout.write(r.yaml())
    return 0


def cmd_config_list(args) -> int:
    from dcv2_k8s.config import preset_names

    for name in preset_names():
        print(name)
    return 0


def cmd_data_synth(args) -> int:
    from dcv2_k8s.data.synth import generate

    try:
        summary = generate(args.out_dir, args.classes, args.train_per_class, args.val_per_class, args.size,
                           args.photo_like, args.seed, kind=args.kind)
    except ValueError as e:
        return _fail(str(e))
    print(json.dumps(summary))
    return 0


def cmd_data_check(args) -> int:
    from dcv2_k8s.data.check import check_dataset

    try:
        res = check_dataset(args.dir, args.workers, progress=sys.stderr.isatty())
    except FileNotFoundError as e:
        return _fail(str(e))
    for path, why in res["bad"]:
        print(f"bad: {path}: {why}")
    for what, n in sorted(res["converted"].items()):
        print(f"converted to RGB on the fly: {count(n, what + ' image')}")
    print(f"{count(res['images'], 'image')}, {len(res['bad'])} unusable (training replaces each by the next good image)")
    return 1 if res["bad"] else 0


def cmd_knn(args) -> int:
    import torch

    from dcv2_k8s.config import ConfigError, config_from_checkpoint, resolve
    from dcv2_k8s.eval.knn import knn_eval
    from dcv2_k8s.model.resnet import build_trunk
    from dcv2_k8s.weights import WeightsError, load_into_trunk, read_file, split_weights

    from dcv2_k8s.data.dataset import SplitMismatch, check_splits

    for d in (args.train, args.val):
        if not os.path.isdir(d):
            return _fail(f"{d}: no such directory (expected an ImageFolder tree)")
    try:
        check_splits(args.train, args.val)
    except (SplitMismatch, FileNotFoundError) as e:
        return _fail(str(e))
    try:
        state = read_file(args.checkpoint) if args.checkpoint else None
        ours = state is not None and "config_yaml" in state
        r = config_from_checkpoint(state, args.tokens, for_training=False) if ours else \
            resolve(args.tokens, for_training=False)
        _note(r)
        torch.manual_seed(r.cfg.SEED_VALUE)
        trunk = build_trunk(r.cfg.MODEL.TRUNK)
        if state is not None:  # any supported layout: ours, torchvision, swav, VISSL
            load_into_trunk(trunk, split_weights(state)[1], args.checkpoint)
    except ConfigError as e:
        return _fail(e.lines)
    except (FileNotFoundError, WeightsError) as e:
        return _fail(str(e))
    size = args.size or r.cfg.DATA.TRAIN.multicrop.large_size
    mean, std = r.cfg.DATA.TRAIN.normalize
    res = knn_eval(trunk, args.train, args.val, size, torch.device("cpu"), args.k, args.temperature,
                   mean=mean, std=std, num_workers=args.workers, progress=sys.stderr.isatty(),
                   pre=r.cfg.DATA.TRAIN.preprocess)
    from dcv2_k8s.eval import what_was_scored

    res.update(what_was_scored(r.cfg, size, args.checkpoint))
    if not args.checkpoint and not args.tokens:
        print(f"dcv2: note: scored a randomly initialised {res['architecture']} at {size} px with the defaults' view; "
              "give a run's tokens (or --checkpoint RUN) to score the network that run trains", file=sys.stderr)
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def cmd_report(args) -> int:
    from dcv2_k8s.report import render
    from dcv2_k8s.storage import StorageError

    remote = "://" in args.run  # a remote run's report is written here: ./report-NAME (docs/evaluation.md)
    out = args.out or (f"report-{args.run.rstrip('/').rsplit('/', 1)[-1]}" if remote else
                       os.path.join(args.run, "report"))
    try:
        page = render(args.run, out)
    except (FileNotFoundError, ValueError, StorageError) as e:
        return _fail(str(e))
    print(page)
    print(f"dcv2: wrote report.html and its plots to {os.path.abspath(out)}", file=sys.stderr)
    return 0


def cmd_k8s_run_local(args) -> int:
    from dcv2_k8s.k8s.local import run_local

    if not os.path.isfile(args.manifest):
        return _fail(f"{args.manifest}: no such file")
    try:
        return run_local(args.manifest, args.set, args.nproc_per_node, args.timeout)
    except (ValueError, KeyError) as e:
        return _fail(f"{args.manifest}: {e}")


def cmd_k8s_render(args) -> int:
    from dcv2_k8s.k8s.manifests import write

    try:
        paths = write(args.out, args.cpu_per_gpu, args.memory_gib_per_gpu, args.scratch_gib)
    except ValueError as e:
        return _fail(str(e))
    for path in paths:
        print(path)
    return 0


def cmd_k8s_validate(args) -> int:
    from dcv2_k8s.k8s.validate import load_crds, validate_paths

    try:
        lines, files, problems = validate_paths(args.files, load_crds(args.crds) if args.crds else {})
    except ValueError as e:
        return _fail(str(e))
    for line in lines:
        print(line)
    print(f"{count(files, 'file')}, {count(problems, 'problem')}")
    return 1 if problems else 0


def cmd_demo(args) -> int:
    from dcv2_k8s.demo import run_demo

    return run_demo(args.out, args.epochs, args.minutes)


# --------------------------------------------------------------------------------------------- parser
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except an empty or off one and where the help already speaks of it."""

    def _get_help_string(self, action):
        if action.default is False or action.default in (None, "", []) or "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """The dcv2 parser and, through add_subparsers, every subcommand's: defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


class _IntermixedParser(_Parser):
    """A subcommand whose options may come after its positionals and between them (``DATA_DIR OUT --head
    config.A=B``): argparse's intermixed parsing, for one subparser (it refuses a parser that has subparsers)."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # parse_known_intermixed_args parses in two passes through this method
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dcv2", description="DeepClusterV2 pretraining (VISSL-compatible config)")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train DCv2: dcv2 train config=NAME [config.KEY=VALUE ...]")
    t.add_argument("tokens", nargs="*", help="config=..., config.A.B=V, +config.A.B=V, +config/GROUP=NAME")
    t.add_argument("--resolved", default="", metavar="FILE",
                   help="run a config resolved by a parent dcv2 process (what it passes to the processes it starts)")
    t.set_defaults(fn=cmd_train)

    c = sub.add_parser("config", help="show the resolved config or list presets")
    csub = c.add_subparsers(dest="config_cmd", required=True)
    cs = csub.add_parser("show", help="print the fully resolved config as YAML (dry run)")
    cs.add_argument("tokens", nargs="*", help="the tokens dcv2 train would get: config=NAME, config.A.B=V, ...")
    cs.set_defaults(fn=cmd_config_show)
    cl = csub.add_parser("list", help="list preset and group files")
    cl.set_defaults(fn=cmd_config_list)

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    ds = dsub.add_parser("synth", help="generate an ImageFolder of JPEGs with class structure")
    ds.add_argument("out_dir", help="where to write OUT_DIR/train/CLASS/*.jpg and OUT_DIR/val/CLASS/*.jpg")
    ds.add_argument("--classes", type=int, default=10, help="number of classes")
    ds.add_argument("--train-per-class", type=int, default=100, help="training images per class")
    ds.add_argument("--val-per-class", type=int, default=20, help="validation images per class")
    ds.add_argument("--size", type=int, default=64, help="image side in pixels")
    ds.add_argument("--photo-like", action="store_true", help="500x375 noisy photos (ImageNet-like JPEGs)")
    ds.add_argument("--seed", type=int, default=0, help="random seed")
    ds.add_argument("--kind", choices=["textures", "shapes", "glyphs", "naturals", "icons"], default="textures",
                    help="what defines a class: a texture family (default), a shape, a digit-like grey glyph, a "
                         "natural-looking texture (clouds, marble, wood, ...) or a multi-part icon in random colours")
    ds.set_defaults(fn=cmd_data_synth)

    st = sub.add_parser("stage", help="copy/extract a dataset from s3:// (or a local path) into a local ImageFolder",
                        description="Reads ImageFolder objects, tar archives (per class, CLASS/IMAGE shards, "
                                    "nested, gzipped), flat validation sets (with --labels) and WebDataset shards, "
                                    "from a prefix, one object or a local path; the source layouts: see "
                                    "docs/staging.md.")
    st.add_argument("src", nargs="?", help="s3://bucket/prefix, s3://bucket/object.tar, or a local path")
    st.add_argument("dest", help="local directory (node-local disk, emptyDir or PVC)")
    st.add_argument("--workers", type=int, default=16, help="parallel transfers")
    st.add_argument("--labels", default="",
                    help="classes of flat images: the ILSVRC 2012 devkit (.tar.gz or directory), LOC_val_solution.csv, "
                         "or an IMAGE,CLASS file; local or s3://")
    st.add_argument("--class-names", default="",
                    help="WebDataset: class names, one per line (line i = label i); default: the zero-padded label")
    st.add_argument("--replace", action="store_true", help="DEST holds another dataset: delete it and stage SRC")
    st.add_argument("--verify", action="store_true",
                    help="re-check DEST against its manifest (size and MD5 of every file) and report differences")
    st.add_argument("--progress", action="store_true", help="progress bar even when not on a terminal")
    st.add_argument("--log-every", type=float, default=30.0, metavar="SECONDS",
                    help="outside a terminal: one progress line every SECONDS (files, bytes, rate, ETA)")
    st.add_argument("--metrics-port", type=int, default=0,
                    help="serve staging progress as Prometheus metrics on this port while staging (0: off)")
    st.add_argument("--no-checksum", action="store_true",
                    help="check staged files by size only (no MD5) when resuming, repairing and verifying")
    st.set_defaults(fn=cmd_stage)

    s3 = sub.add_parser("s3", help="embedded S3 endpoint for local runs")
    s3sub = s3.add_subparsers(dest="s3_cmd", required=True)
    sv = s3sub.add_parser("serve", help="serve an in-memory S3 API on 127.0.0.1 until interrupted")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=int, default=9000, help="port to listen on")
    sv.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    sv.set_defaults(fn=cmd_s3_serve)

    dc = dsub.add_parser("check", help="decode every image of a dataset and list the unusable ones")
    dc.add_argument("dir", help="an ImageFolder (DIR/CLASS/IMAGE)")
    dc.add_argument("--workers", type=int, default=4, help="parallel decoding processes")
    dc.set_defaults(fn=cmd_data_check)

    le = sub.add_parser("linear-eval", help="linear evaluation of a frozen trunk (VISSL-style tokens)")
    le.add_argument("tokens", nargs="*", help="config=benchmark/linear_image_classification/imagenet1k/... "
                                              "config.MODEL.WEIGHTS_INIT.PARAMS_FILE=... config.DATA...")
    le.add_argument("--resolved", default="", metavar="FILE", help=argparse.SUPPRESS)
    le.set_defaults(fn=cmd_linear_eval)

    ex = sub.add_parser("export", help="export weights as a torchvision state dict or the swav/VISSL layout")
    ex.add_argument("checkpoint", help="checkpoint dir, run dir, state.pt, or a swav/VISSL/torchvision file")
    ex.add_argument("out", help="output .pth (local or s3://)")
    ex.add_argument("--format", choices=["torchvision", "swav"], default="torchvision",
                    help="torchvision: a ResNet state dict; swav: the swav/VISSL layout")
    ex.add_argument("--depth", type=int, default=50, help="ResNet depth when the source has no config (imports)")
    ex.set_defaults(fn=cmd_export)

    cl = sub.add_parser("clusters", help="assign images to the trained clusters: CSV, sizes, contact sheets")
    cl.add_argument("checkpoint", help="one of our DCv2 checkpoints (checkpoint dir, run dir or state.pt; local or "
                                       "s3://): it holds the centroids")
    cl.add_argument("data_dir", help="an ImageFolder split (DATA_DIR/CLASS/IMAGE) to assign")
    cl.add_argument("out", help="output directory for assignments.csv, cluster_sizes.json and the contact sheets")
    cl.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    cl.set_defaults(fn=cmd_clusters)

    xf = sub.add_parser("extract", help="frozen features of a split to .npy: features, labels, paths, meta.json",
                        description="Trunk features (res5avg, VISSL's extract_features engine) and optionally the "
                                    "head's embeddings of every image of DATA_DIR, in its sorted order; see "
                                    "docs/evaluation.md.")
    xf.__class__ = _IntermixedParser  # options anywhere: dcv2 extract DATA_DIR OUT --checkpoint W config.A=B
    xf.add_argument("data_dir", help="an ImageFolder split (DATA_DIR/CLASS/IMAGE; labels = class index), or a "
                                     "directory of images (labels -1)")
    xf.add_argument("out", help="output directory, local or s3://")
    xf.add_argument("tokens", nargs="*", help="config tokens: the architecture for torchvision/swav/VISSL files and "
                                              "random init; with one of our checkpoints, applied on its config")
    xf.add_argument("--checkpoint", help="our checkpoint (dir, run dir, state.pt; local or s3://) or a torchvision, "
                                         "swav or VISSL weights file; omit for random initialisation")
    xf.add_argument("--head", action="store_true",
                    help="also write head.npy: the projection head's L2-normalised embeddings")
    xf.add_argument("--size", type=int, default=0, help="center-crop size (default: the weights' large crop size)")
    xf.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    xf.add_argument("--workers", type=int, default=2, help="data-loading worker processes per rank")
    xf.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                    help="auto: this rank's GPU when there is one")
    xf.add_argument("--nproc", type=int, default=1,
                    help="processes on this node (torchrun), each extracting one shard; under torchrun or a "
                         "PyTorchJob the launcher's ranks are used")
    xf.add_argument("--split", default="", help="the split's name in meta.json (default: DATA_DIR's last part)")
    xf.set_defaults(fn=cmd_extract)

    k = sub.add_parser("knn", help="weighted k-NN accuracy of frozen trunk features")
    k.add_argument("--train", required=True, help="ImageFolder used as the k-NN memory")
    k.add_argument("--val", required=True, help="ImageFolder of queries")
    k.add_argument("--checkpoint", help="checkpoint dir/run dir/state.pt; omit for random initialisation")
    k.add_argument("--size", type=int, default=0, help="eval crop size (default: the large crop size)")
    k.add_argument("--k", type=int, default=20, help="neighbours that vote")
    k.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / temperature)")
    k.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    k.add_argument("--json", help="also write the result here")
    k.add_argument("tokens", nargs="*", help="config tokens (model architecture for random init)")
    k.set_defaults(fn=cmd_knn)

    rp = sub.add_parser("report", help="PNG plots and an HTML page of a run's logged metrics")
    rp.add_argument("run", help="the run's CHECKPOINT.DIR (local or s3://)")
    rp.add_argument("--out", default="", help="output directory (default RUN/report; for an s3:// RUN, "
                                              "./report-NAME, NAME being RUN's last path part)")
    rp.set_defaults(fn=cmd_report)

    k8 = sub.add_parser("k8s", help="Kubernetes: render and validate manifests, run a PyTorchJob locally")
    k8sub = k8.add_subparsers(dest="k8s_cmd", required=True)
    rl = k8sub.add_parser("run-local", help="run a PyTorchJob's or a TrainJob's pods as local processes with the "
                                            "environment the training operator or Trainer v2 gives them")
    rl.add_argument("manifest", help="a PyTorchJob or TrainJob YAML (e.g. from dcv2 k8s render)")
    rl.add_argument("--set", action="append", default=[], metavar="config.KEY=VALUE",
                    help="appended to the trainer command (repeatable)")
    rl.add_argument("--nproc-per-node", type=int, default=None, help="override nprocPerNode (GPUs) for a CPU run")
    rl.add_argument("--timeout", type=float, default=0, help="kill every replica after this many seconds (0: no limit)")
    rl.set_defaults(fn=cmd_k8s_run_local)
    rr = k8sub.add_parser("render", help="write the manifests rendered from dcv2_k8s/k8s/manifests.py")
    rr.add_argument("out", nargs="?", default="manifests", help="directory to write the manifests into")
    rr.add_argument("--cpu-per-gpu", type=float, default=10.0, metavar="CORES",
                    help="CPU cores each job's trainer container requests per GPU (fractions allowed, e.g. 0.5; "
                         "the limit is 1.2 x the request; default: 10, which fits nodes with 12+ cores per GPU)")
    rr.add_argument("--memory-gib-per-gpu", type=float, default=48.0, metavar="GIB",
                    help="memory (GiB) each job's trainer container requests per GPU (the limit is 64/48 x the "
                         "request and includes /dev/shm, 8 GiB per GPU or half the limit if less; default: 48)")
    rr.add_argument("--scratch-gib", type=float, default=200.0, metavar="GIB",
                    help="node-local disk (GiB of ephemeral-storage) each pod requests for the staged data and /tmp "
                         "(the volumes' own size limits stay; default: 200, ImageNet train + val staged)")
    rr.set_defaults(fn=cmd_k8s_render)
    rv = k8sub.add_parser("validate", help="validate manifests strictly against the API types (offline)")
    rv.add_argument("files", nargs="+", help="manifest YAML files (multi-document files too)")
    rv.add_argument("--crds", default="", metavar="DIR",
                    help="a directory of CustomResourceDefinition YAMLs (e.g. Kubeflow Trainer v2.3.0's) to check "
                         "custom resources such as TrainJob and TrainingRuntime against, unknown fields included")
    rv.set_defaults(fn=cmd_k8s_validate)

    dm = sub.add_parser("demo", help="generate data, train with 2 CPU processes, compare k-NN vs random init")
    dm.add_argument("--out", default="demo_out", help="directory for the data, checkpoints and results")
    dm.add_argument("--epochs", type=int, default=0, help="override the demo preset's epochs (0: the preset's)")
    dm.add_argument("--minutes", type=float, default=0, help="informational time budget (0: none)")
    dm.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Its exit code follows ``dcv2_k8s.exitcodes``; a process started by torchrun also leaves
    it for the node's launcher, which combines them into the container's code."""
    from dcv2_k8s import distributed as D

    args = build_parser().parse_args(argv)
    try:
        code = args.fn(args)
    except SystemExit as e:
        D.record_exit_code(e.code if isinstance(e.code, int) else exitcodes.USAGE)
        raise
    except KeyboardInterrupt as e:  # Ctrl-C: after a committed checkpoint (engine.Interrupted) or at once
        D.record_exit_code(exitcodes.INTERRUPTED)
        if not D.launched() and type(e) is KeyboardInterrupt:  # under torchrun the node's launcher says it
            print(f"dcv2: interrupted: stopped at once (exit {exitcodes.INTERRUPTED})", file=sys.stderr)
        return exitcodes.INTERRUPTED
    except Exception as e:
        code = exitcodes.classify(e)
        D.record_exit_code(code)
        if not exitcodes.retryable(code):
            raise  # a bug: the traceback, exit 1
        import traceback

        traceback.print_exc()
        print(f"dcv2: error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''} (an infrastructure "
              f"fault: exit {code}, the job restarts and resumes from its last checkpoint)", file=sys.stderr)
        return code
    D.record_exit_code(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
