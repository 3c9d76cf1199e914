"""Config resolution: VISSL's command lines and file shapes, validation errors, derived values."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from dcv2_k8s.config import ConfigError, resolve, to_yaml
from tests.conftest import run_cli

BASE = "config=pretrain/deepcluster_v2/deepclusterv2_2crops_resnet"
MC = "+config/pretrain/deepcluster_v2/transforms"
LOSS = "config.LOSS.deepclusterv2_loss"


def errors_of(tokens, **kw) -> list[str]:
    with pytest.raises(ConfigError) as e:
        resolve(tokens, **kw)
    return e.value.lines


# ------------------------------------------------------------------ the commands of VISSL's DCv2 page
def test_base_preset():
    c = resolve([BASE]).cfg
    assert c.MODEL.TRUNK.RESNETS.DEPTH == 50
    assert list(c.LOSS.deepclusterv2_loss.num_clusters) == [3000, 3000, 3000]
    assert c.DATA.TRAIN.multicrop.sizes == [224, 224] and c.DATA.TRAIN.BATCHSIZE_PER_REPLICA == 64
    assert c.OPTIMIZER.use_larc and c.OPTIMIZER.larc_config.trust_coefficient == 0.001


def test_loss_overrides():
    c = resolve([BASE, f"{LOSS}.temperature=0.2", f"{LOSS}.memory_params.embedding_dim=256",
                 'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [2048, 2048], "use_relu": True}], '
                 '["mlp", {"dims": [2048, 256]}]]']).cfg
    assert c.LOSS.deepclusterv2_loss.temperature == 0.2
    assert c.LOSS.deepclusterv2_loss.memory_params.embedding_dim == 256


def test_embedding_dim_alone_the_head_follows():
    r = resolve([BASE, f"{LOSS}.memory_params.embedding_dim=256"])
    assert r.cfg.MODEL.HEAD.PARAMS[-1].dims == (2048, 256)
    assert any("128 -> 256" in n and "embedding_dim" in n for n in r.notes)


def test_own_head_disagreeing_with_the_embedding_names_both_values():
    lines = errors_of([BASE, f"{LOSS}.memory_params.embedding_dim=256",
                       'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [2048, 128]}]]'])
    assert any("embedding_dim=256" in l and "head outputs 128" in l for l in lines)


def test_trunk_depth_width():
    c = resolve([BASE, "config.MODEL.TRUNK.NAME=resnet", "config.MODEL.TRUNK.RESNETS.DEPTH=101"]).cfg
    assert c.MODEL.TRUNK.RESNETS.DEPTH == 101
    r = resolve([BASE, "config.MODEL.TRUNK.RESNETS.DEPTH=101", "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=2"])
    assert r.cfg.MODEL.HEAD.PARAMS[0].dims == (4096, 2048)  # the head follows the 2x wider trunk
    assert any("2048 -> 4096" in n and "ResNet-101 x2" in n for n in r.notes)
    lines = errors_of([BASE, "config.MODEL.TRUNK.RESNETS.DEPTH=101", "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=2",
                       'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [2048, 128]}]]'])  # the user's own head
    assert any("dims starts at 2048" in l and "4096" in l for l in lines)
    c = resolve([BASE, "+config/pretrain/deepcluster_v2/models=resnet50_w2"]).cfg
    assert c.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER == 2 and c.MODEL.HEAD.PARAMS[0].dims[0] == 4096


@pytest.mark.parametrize("group,crops,sizes", [("multicrop_2x160_4x96", 6, [160, 96]),
                                               ("multicrop_2x224_6x96", 8, [224, 96])])
def test_multicrop_group_changes_train_transforms(group, crops, sizes):
    c = resolve([BASE, f"{MC}={group}"]).cfg
    assert c.DATA.TRAIN.TRANSFORMS[0].name == "ImgPilToMultiCrop"
    mc = c.DATA.TRAIN.multicrop
    assert list(mc.size_crops) == sizes and mc.total_num_crops == crops == len(mc.sizes)


def test_epochs_and_distributed_overrides():
    c = resolve([BASE, "config.OPTIMIZER.num_epochs=100", "config.DISTRIBUTED.NUM_PROC_PER_NODE=1",
                 "config.DISTRIBUTED.NUM_NODES=1"]).cfg
    assert c.OPTIMIZER.num_epochs == 100 and c.DISTRIBUTED.NUM_NODES == 1


def test_model_and_head_groups():
    for name in ("resnet101", "resnet50_w2", "resnet50_w4"):
        resolve([BASE, f"+config/pretrain/deepcluster_v2/models={name}"])
    for name in ("swav_reference", "mlp_3layer", "mlp_hidden4096"):
        resolve([BASE, f"+config/pretrain/deepcluster_v2/heads={name}"])


def test_add_key_and_existing_key():
    r = resolve([BASE, "+config.MY_NOTE=hello"])
    assert r.cfg.extra["MY_NOTE"] == "hello" and any("MY_NOTE" in n for n in r.notes)
    assert yaml.safe_load(r.yaml())["config"]["MY_NOTE"] == "hello"
    assert any("exists already" in l for l in errors_of([BASE, "+config.SEED_VALUE=3"]))


def test_yaml_typed_values():
    c = resolve([BASE, f"{LOSS}.num_clusters=[100, 200]", "config.MODEL.AMP_PARAMS.AMP_ARGS={opt_level: O2}"]).cfg
    assert list(c.LOSS.deepclusterv2_loss.num_clusters) == [100, 200]
    assert c.MODEL.AMP_PARAMS.AMP_ARGS["opt_level"] == "O2"


# ----------------------------------------------------------------------------- VISSL-shaped files
VISSL_SHAPED = textwrap.dedent("""\
    # @package _global_
    config:
      VERBOSE: False
      LOG_FREQUENCY: 10
      TEST_ONLY: False
      MULTI_PROCESSING_METHOD: forkserver
      HOOKS:
        PERF_STATS: {MONITOR_PERF_STATS: True}
      DATA:
        NUM_DATALOADER_WORKERS: 8
        TRAIN:
          DATA_SOURCES: [disk_folder]
          DATASET_NAMES: [imagenet1k_folder]
          BATCHSIZE_PER_REPLICA: 16
          LABEL_TYPE: sample_index
          TRANSFORMS:
            - name: ImgPilToMultiCrop
              total_num_crops: 2
              size_crops: [224]
              num_crops: [2]
              crop_scales: [[0.14, 1]]
            - name: RandomHorizontalFlip
              p: 0.5
            - name: ToTensor
          COLLATE_FUNCTION: multicrop_collator
          MMAP_MODE: True
          DROP_LAST: True
      TRAINER: {TRAIN_STEP_NAME: standard_train_step}
      METERS: {name: ""}
      MODEL:
        TRUNK: {NAME: resnet, RESNETS: {DEPTH: 50}}
        HEAD:
          PARAMS: [
            ["mlp", {"dims": [2048, 2048], "use_relu": True, "skip_last_layer_relu_bn": False}],
            ["mlp", {"dims": [2048, 128]}],
          ]
        TEMP_FROZEN_PARAMS_ITER_MAP: []
        SYNC_BN_CONFIG: {CONVERT_BN_TO_SYNC_BN: True, SYNC_BN_TYPE: pytorch}
        AMP_PARAMS: {USE_AMP: True, AMP_ARGS: {"opt_level": "O1"}}
      LOSS:
        name: deepclusterv2_loss
        deepclusterv2_loss:
          num_train_samples: 1281167
          BATCHSIZE_PER_REPLICA: 64
          num_crops: 2
          temperature: 0.1
          num_clusters: [10, 10, 10]
          kmeans_iters: 10
          memory_params: {crops_for_mb: [0, 1], embedding_dim: 128}
      OPTIMIZER:
          name: sgd
          use_larc: True
          larc_config: {clip: False, trust_coefficient: 0.001, eps: 0.00000001}
          weight_decay: 0.000001
          momentum: 0.9
          nesterov: False
          num_epochs: 1
          regularize_bn: True
          regularize_bias: True
          param_schedulers:
            lr:
              auto_lr_scaling: {auto_scale: true, base_value: 0.3, base_lr_batch_size: 256}
              name: cosine
              start_value: 0.15
              end_value: 0.0000
              update_interval: step
      DISTRIBUTED: {DISTR_ON: True, BACKEND: nccl, NUM_NODES: 1, NUM_PROC_PER_NODE: 2, INIT_METHOD: tcp, RUN_ID: auto}
      MACHINE: {DEVICE: gpu}
      CHECKPOINT: {DIR: ".", AUTO_RESUME: True, CHECKPOINT_FREQUENCY: 5, OVERWRITE_EXISTING: true}
    """)
BUGGY_GROUP = textwrap.dedent("""\
    # @package _global_
    config:
      DATA:
        TRANSFORMS:
          - {name: ImgPilToMultiCrop, total_num_crops: 6, size_crops: [160, 96], num_crops: [2, 4],
             crop_scales: [[0.08, 1], [0.05, 0.14]]}
    """)


def test_vissl_shaped_file_loads_and_reports_ignored_keys(tmp_path):
    f = tmp_path / "vissl_dcv2.yaml"
    f.write_text(VISSL_SHAPED)
    r = resolve([f"config={f}"])
    ignored = [n for n in r.notes if n.startswith("ignored")]
    for key in ("VERBOSE", "HOOKS", "METERS", "DATA.TRAIN.MMAP_MODE", "DISTRIBUTED.RUN_ID"):
        assert sum(f"config.{key}" in n for n in ignored) == 1  # reported once
    # VISSL's repeated loss values are checked against their sources (a note names both) and never read
    assert not hasattr(r.cfg.LOSS.deepclusterv2_loss, "BATCHSIZE_PER_REPLICA")
    assert any("BATCHSIZE_PER_REPLICA" in n and "16" in n and "64" in n for n in r.notes)
    assert any("num_train_samples" in n and "1281167" in n for n in r.notes)
    # auto LR scaling of a single cosine schedule: 0.3 x (16 x 2) / 256
    assert r.cfg.OPTIMIZER.param_schedulers.lr.start_value == pytest.approx(0.0375)


def test_vissl_buggy_group_file_is_an_error(tmp_path):
    base, grp = tmp_path / "base.yaml", tmp_path / "multicrop.yaml"
    base.write_text(VISSL_SHAPED)
    grp.write_text(BUGGY_GROUP)
    lines = errors_of([f"config={base}", f"+config/pretrain/deepcluster_v2/transforms={grp}"])
    assert any("DATA.TRANSFORMS is not read" in l and "DATA.TRAIN.TRANSFORMS" in l for l in lines)


# ------------------------------------------------------------------------------------- validation
def test_unknown_key_suggests():
    lines = errors_of([BASE, "config.OPTIMIZER.num_epoch=3"])
    assert lines == ["config.OPTIMIZER.num_epoch (from the command line) is not a known key; "
                     "did you mean config.OPTIMIZER.num_epochs=3?"]
    lines = errors_of([BASE, f"{LOSS}.temprature=0.2"])
    assert any("did you mean config.LOSS.deepclusterv2_loss.temperature" in l for l in lines)


def test_wrong_type():
    lines = errors_of([BASE, "config.MODEL.TRUNK.RESNETS.DEPTH=fifty"])
    assert lines == ["config.MODEL.TRUNK.RESNETS.DEPTH='fifty' must be an integer, got a string"]
    assert any("must be a boolean" in l for l in errors_of([BASE, "config.OPTIMIZER.use_larc=3"]))


def _mc(total, nc, sc, cs):
    return (f"config.DATA.TRAIN.TRANSFORMS=[{{name: ImgPilToMultiCrop, total_num_crops: {total}, "
            f"num_crops: {nc}, size_crops: {sc}, crop_scales: {cs}}}, {{name: ToTensor}}]")


def test_crops_sum_mismatch():
    lines = errors_of([BASE, _mc(5, [2, 4], [160, 96], [[0.08, 1], [0.05, 0.14]])])
    assert any("sum(num_crops)=6 != total_num_crops=5" in l for l in lines)


def test_crop_list_lengths():
    lines = errors_of([BASE, _mc(6, [2, 4], [160], [[0.08, 1], [0.05, 0.14]])])
    assert any("must have the same length" in l for l in lines)


def test_crops_for_mb_must_be_large_crops():
    lines = errors_of([BASE, "+config/pretrain/deepcluster_v2/transforms=multicrop_2x160_4x96",
                       f"{LOSS}.memory_params.crops_for_mb=[0, 3]"])
    assert any("crops_for_mb=[0, 3] must index the large crops" in l for l in lines)


def test_clusters_larger_than_bank():
    from dcv2_k8s.config.derive import check_dataset

    lines = check_dataset(resolve([BASE], world_size=8, local_world_size=8).cfg, 10000)
    # ceil(10000 / 8) = 1250 -> 19 batches of 64 = 1216 per rank
    assert any("3000 clusters" in l and "1216" in l for l in lines)


def test_group_size_must_divide_world():
    lines = errors_of([BASE, "config.MODEL.SYNC_BN_CONFIG.GROUP_SIZE=3"], world_size=8, local_world_size=8)
    assert any("GROUP_SIZE=3 does not divide the world size 8" in l for l in lines)


def test_world_size_mismatch_under_launcher():
    lines = errors_of([BASE, "config.DISTRIBUTED.NUM_NODES=2", "config.DISTRIBUTED.NUM_PROC_PER_NODE=8"],
                      world_size=4, local_world_size=4)
    assert any("2 x 8 = 16" in l and "WORLD_SIZE=4" in l for l in lines)
    c = resolve([BASE], world_size=16, local_world_size=8).cfg  # unset: taken from the launcher
    assert (c.DISTRIBUTED.NUM_NODES, c.DISTRIBUTED.NUM_PROC_PER_NODE) == (2, 8)


def test_cli_derived_conflict_names_both_values():
    lines = errors_of([BASE, f"{MC}=multicrop_2x160_4x96", f"{LOSS}.num_crops=2"])
    assert any("num_crops=2 conflicts with the derived value 6" in l for l in lines)


def test_every_error_is_reported_at_once():
    lines = errors_of([BASE, "config.OPTIMIZER.num_epoch=3", "config.MODEL.TRUNK.RESNETS.DEPTH=fifty",
                       "config.SEED_VALU=1"])
    assert len(lines) == 3


def test_unknown_preset_and_group():
    assert any("did you mean config=pretrain/deepcluster_v2/deepclusterv2_2crops_resnet" in l
               for l in errors_of(["config=pretrain/deepcluster_v2/deepclusterv2_2crop_resnet"]))
    assert any("choose one of" in l for l in errors_of([BASE, f"{MC}=multicrop_9x9"]))


# ------------------------------------------------------------------------------------ derived LR
def test_lr_scaling_follows_world_size():
    c = resolve([BASE], world_size=64, local_world_size=8).cfg
    s = c.OPTIMIZER.param_schedulers.lr.schedulers
    assert s[0].end_value == pytest.approx(4.8) and s[1].start_value == pytest.approx(4.8)
    c = resolve([BASE], world_size=8, local_world_size=8).cfg
    assert c.OPTIMIZER.param_schedulers.lr.schedulers[1].start_value == pytest.approx(0.6)


def test_explicit_lr_with_auto_scale_is_a_conflict():
    lines = errors_of([BASE, "config.OPTIMIZER.param_schedulers.lr.schedulers=[{name: linear, start_value: 0.3, "
                             "end_value: 2.0}, {name: cosine, start_value: 2.0, end_value: 0}]"],
                      world_size=8, local_world_size=8)
    assert any("conflicts with the derived value 0.6" in l for l in lines)


# ---------------------------------------------------------------------------------------- the CLI
def test_config_show_is_a_dry_run_printing_yaml():
    p = run_cli("config", "show", BASE, f"{MC}=multicrop_2x160_4x96", timeout=120)
    assert p.returncode == 0, p.stderr
    cfg = yaml.safe_load(p.stdout)["config"]
    assert cfg["DATA"]["TRAIN"]["TRANSFORMS"][0]["num_crops"] == [2, 4]


def test_config_errors_exit_2_one_line_each():
    p = run_cli("config", "show", BASE, "config.OPTIMIZER.num_epoch=3", "config.MODEL.TRUNK.RESNETS.DEPTH=x",
                timeout=120)
    assert p.returncode == 2
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 2 and all(l.startswith("dcv2: error: config.") for l in lines)


def test_to_yaml_round_trips():
    r = resolve([BASE])
    assert yaml.safe_load(to_yaml(r.raw))["config"]["MODEL"]["TRUNK"]["RESNETS"]["DEPTH"] == 50
    assert resolve([BASE]).cfg == r.cfg  # typed configs compare by value


def test_resolved_file_round_trips_and_resolves_to_itself(tmp_path):
    """What a parent hands to the processes it starts (``--resolved FILE``) is the same typed config; given back as
    ``config=FILE`` it resolves to the same values (derivation is idempotent)."""
    from dcv2_k8s.config import load_resolved, write_resolved

    r = resolve([BASE, f"{MC}=multicrop_2x160_4x96", "config.MODEL.TRUNK.RESNETS.DEPTH=101",
                 f"{LOSS}.memory_params.embedding_dim=256", "+config.MY_NOTE=x"], world_size=16, local_world_size=8)
    path = write_resolved(r, tmp_path / "resolved.yaml")
    back = load_resolved(path)
    assert back.cfg == r.cfg and back.name == r.name and back.raw == r.raw
    again = resolve([f"config={path}"], world_size=16, local_world_size=8)
    assert again.cfg.MODEL == r.cfg.MODEL and again.cfg.OPTIMIZER == r.cfg.OPTIMIZER and again.cfg.DATA == r.cfg.DATA


# --------------------------------------------------------------------------- one key, one type, one pass
@pytest.mark.parametrize("token,line", [
    ("config.METRICS.PORT=70000", "config.METRICS.PORT=70000 must be a TCP port between 1 and 65535"),
    ("config.DATA.TRAIN.AUG_BACKEND=dali", "config.DATA.TRAIN.AUG_BACKEND='dali': choose pil or opencv"),
    ("config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=0", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=0 must be >= 1"),
    (f"{LOSS}.num_clusters=[100, 1]", f"{LOSS}.num_clusters=[100, 1] must be a non-empty list of integers > 1"),
    (f"{LOSS}.temperature=0", f"{LOSS}.temperature must be > 0"),
    (f"{LOSS}.kmeans_iters=-1", f"{LOSS}.kmeans_iters must be an integer >= 0"),
    ("config.MODEL.TRUNK.NAME=vit", "config.MODEL.TRUNK.NAME='vit': only 'resnet' is supported"),
    ("config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=0.3", "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=0.3: must be "
     "positive with 64 x width a whole number of channels (e.g. 0.25, 0.5, 1, 2, 4)"),
    ("config.DISTRIBUTED.NUM_NODES=0", "config.DISTRIBUTED.NUM_NODES=0 must be >= 1"),
    ("config.DISTRIBUTED.BACKEND=mpi", "config.DISTRIBUTED.BACKEND='mpi': choose auto, nccl or gloo"),
    ("config.MACHINE.DEVICE=tpu", "config.MACHINE.DEVICE='tpu': choose auto, gpu or cpu"),
    ("config.MODEL.AMP_PARAMS.DTYPE=float8", "config.MODEL.AMP_PARAMS.DTYPE='float8': choose float16 or bfloat16"),
    ("config.MONITOR.DIAG_IMAGES=1", "config.MONITOR.DIAG_IMAGES=1 must be an integer >= 2"),
    ("config.TRAINER.NONFINITE_POLICY=ignore", "config.TRAINER.NONFINITE_POLICY='ignore': choose stop or skip"),
    ("config.OPTIMIZER.num_epochs=0", "config.OPTIMIZER.num_epochs must be >= 1"),
    ("config.OPTIMIZER.param_schedulers.lr.update_interval=batch",
     "config.OPTIMIZER.param_schedulers.lr.update_interval must be step or epoch"),
    (_mc(2, [2], [224], [[0.5, 2]]), "config.DATA.TRAIN.TRANSFORMS[ImgPilToMultiCrop]: crop_scales entry [0.5, 2] "
     "must be [min, max] with 0 < min <= max <= 1"),
])
def test_a_value_wrong_on_its_own_is_one_line_from_its_field(token, line):
    """A key's own rule is declared with its type (``schema.checked``) and reported in the pass that types it."""
    assert errors_of([BASE, token]) == [line]


def test_a_field_rule_runs_wherever_the_section_is_typed():
    from dcv2_k8s import schema

    loss = {"temperature": 0.1, "num_clusters": [1], "kmeans_iters": 10,
            "memory_params": {"crops_for_mb": [0], "embedding_dim": 128}}
    with pytest.raises(ValueError, match=r"num_clusters=\[1\] must be a non-empty list of integers > 1"):
        schema.build_section(schema.DCv2Loss, loss, "LOSS.deepclusterv2_loss")


def test_a_config_is_typed_once_per_process(tmp_path, monkeypatch):
    """``resolve`` types the composed values once (derived values join them typed, through ``with_values``); a rank
    types the resolved file once."""
    from dcv2_k8s import schema
    from dcv2_k8s.config import load_resolved, write_resolved

    calls = []
    build = schema.build
    monkeypatch.setattr(schema, "build", lambda *a: calls.append(1) or build(*a))
    r = resolve([BASE], world_size=16, local_world_size=8)
    assert len(calls) == 1 and r.cfg.DISTRIBUTED.NUM_NODES == 2
    assert r.cfg.OPTIMIZER.param_schedulers.lr.schedulers[0].end_value == pytest.approx(1.2)  # 0.3 x 16 x 64 / 256
    back = load_resolved(write_resolved(r, tmp_path / "resolved.yaml"))
    assert len(calls) == 2 and back.cfg == r.cfg
