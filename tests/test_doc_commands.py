"""Every command the docs show as something to type is run by a test: each ```bash block of README.md and docs/
runs here as a shell script, with only the rewrites listed in REWRITES (named in docs/testing.md), or names the
test that runs it.

A block is one of:
- cluster commands (``kubectl``, ``helm``, ``docker``): the files they name must exist; the objects they apply are
  applied server-side on the cluster of tests/test_kube_e2e.py, and the blocks that apply and watch a PyTorchJob
  (docs/kubernetes.md) and a TrainJob (docs/trainer-v2.md) are typed there as they are, with the real kubectl;
- ``make`` targets: run by the test or CI step named in MAKE_TARGETS;
- anything else: run with bash in a scratch directory, in doc order, ``set -e``: a command that fails fails the test.
  A ``dcv2 train`` line that is one of VISSL's page commands (tests/test_seed_commands.py resolves and trains each)
  is left out; a line sized for more processes than this machine has is resolved with ``dcv2 config show`` (the
  same resolution and validation ``train`` does first) under the launcher's world size.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, child_env
from tests.test_seed_commands import SEED

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLUSTER = {"kubectl", "helm", "docker"}
SMOKE = "+config/pretrain/deepcluster_v2/smoke=cpu"
# make target -> (file, text in it) that shows it is run
MAKE_TARGETS = {"demo": ("tests/test_learning.py", "def test_demo_trained_features_beat_random_init"),
                "test": (".ci/run", "make test"),
                "install": ("Makefile", "test: $(STAMP)"),
                "docs": ("tests/test_docs.py", "def test_site_builds_strictly")}
# the rewrites applied before a block runs (docs/testing.md names them): data and scratch paths into the scratch
# directory (/data/mine and /data/imagenet are the generated /data/synth), and a free port for the local S3
REWRITES = [("/data/mine/", "/data/synth/"), ("/data/imagenet/", "/data/synth/"),
            (" /data/", " {W}/data/"), ("[/data/", "[{W}/data/"), (" /tmp/", " {W}/tmp/"), ("[/tmp/", "[{W}/tmp/"),
            ("=/tmp/", "={W}/tmp/"), ("127.0.0.1:9000", "127.0.0.1:{PORT}"),
            ("dcv2 s3 serve ", "dcv2 s3 serve --port {PORT} ")]


def _blocks() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M):
            line = text[:m.start()].count("\n") + 1
            out.append((f"{page.relative_to(ROOT)}:{line}", m.group(1)))
    return out


def _commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, quotes spanning lines kept, comments (a ``#`` that starts
    a word, outside quotes) dropped."""
    cmds, cur, quote, i = [], "", "", 0
    while i < len(block):
        c = block[i]
        if quote:
            quote = "" if c == quote else quote
        elif c == "#" and (not cur or cur[-1].isspace()):  # a comment, to the end of the line
            end = block.find("\n", i)
            i = len(block) if end < 0 else end
            continue
        elif c in "'\"":
            quote = c
        elif c == "\\" and block[i + 1:i + 2] == "\n":
            i += 2
            cur += " "
            continue
        elif c == "\n":
            cmds.append(cur)
            cur = ""
            i += 1
            continue
        cur += c
        i += 1
    cmds.append(cur)
    return [c.strip() for c in cmds if c.strip()]


def _argv(cmd: str) -> list[str]:
    return shlex.split(cmd, comments=True)


BLOCKS = _blocks()


def _kind(block: str) -> str:
    progs = {_argv(c)[0] for c in _commands(block)}
    if progs & CLUSTER:
        assert progs <= CLUSTER, f"a block mixes cluster commands with others: {sorted(progs)}"
        return "cluster"
    if progs <= {"make", "source"}:
        return "make"
    return "run"


def test_the_docs_show_commands_and_every_block_is_classified():
    kinds = {where: _kind(b) for where, b in BLOCKS}
    assert kinds, "no ```bash block found in README.md or docs/"
    assert "run" in kinds.values() and "cluster" in kinds.values()
    # every line that starts a command is one of the commands parsed (none swallowed by a comment or a quote)
    for where, block in BLOCKS:
        starts = {_argv(c)[0] for c in _commands(block)}
        for line in block.splitlines():
            word = line.split(" ", 1)[0]
            if word in ("dcv2", "torchrun", "python", "kubectl", "make"):
                assert word in starts and any(c.startswith(line.strip().split(" #")[0].strip()[:30])
                                              for c in _commands(block)), f"{where}: `{line}` is not parsed"


@pytest.mark.parametrize("where,block", [pytest.param(*b, id=b[0]) for b in BLOCKS if _kind(b[1]) == "cluster"])
def test_cluster_commands_name_files_that_exist(where, block):
    for cmd in _commands(block):
        for tok in _argv(cmd):
            if re.match(r"(manifests|docker)/", tok) and "*" not in tok:
                assert (ROOT / tok).exists(), f"{where}: `{cmd}` names {tok}, which does not exist"


@pytest.mark.parametrize("where,block", [pytest.param(*b, id=b[0]) for b in BLOCKS if _kind(b[1]) == "make"])
def test_make_targets_are_run_by_a_test_or_ci(where, block):
    for cmd in _commands(block):
        for part in cmd.split("&&"):
            argv = _argv(part)
            if argv[0] == "make":
                assert argv[1] in MAKE_TARGETS, f"{where}: `make {argv[1]}` is run by no test"
                path, text = MAKE_TARGETS[argv[1]]
                assert text in (ROOT / path).read_text(), f"{where}: {path} no longer runs `make {argv[1]}`"


def _seed_tokens() -> list[list[str]]:
    return [tokens for _, tokens, _ in SEED]


def _world(argv: list[str]) -> tuple[int, dict]:
    """How many processes a command asks for, and the launcher variables torchrun would give it."""
    if argv[0] == "torchrun":
        nnodes = int(argv[argv.index("--nnodes") + 1])
        nproc = int(argv[argv.index("--nproc-per-node") + 1])
        return nnodes * nproc, {"PET_NNODES": str(nnodes), "PET_NPROC_PER_NODE": str(nproc)}
    for tok in argv:
        if tok.startswith("config.DISTRIBUTED.NUM_PROC_PER_NODE="):
            return int(tok.split("=", 1)[1]), {}
    return 1, {}


def _setup_step(part: str) -> bool:
    """``make install`` and ``source .venv/bin/activate``: what the test's environment is already (the suite runs in
    the venv that ``make test`` installed, with its bin/ first on PATH)."""
    argv = _argv(part)
    return argv[:2] == ["make", "install"] or argv == ["source", ".venv/bin/activate"]


def _rewrite(cmd: str) -> str | None:
    """The command as this test runs it (None: run by another test)."""
    parts = [p for p in cmd.split("&&") if not _setup_step(p)]
    if not parts:
        return None
    cmd = "&&".join(parts).strip()
    argv = _argv(cmd)
    if argv[:2] == ["dcv2", "train"] and argv[2:] in _seed_tokens():
        return None  # VISSL's page commands: tests/test_seed_commands.py
    world, env = _world(argv)
    if world > 2:  # more processes than this machine has: resolve and validate as the run would, do not train
        tokens = argv[argv.index("train") + 1:] if argv[0] == "torchrun" else argv[2:]
        prefix = " ".join(f"{k}={v}" for k, v in env.items())
        return f"{prefix} dcv2 config show {shlex.join(tokens)} > /dev/null".strip()
    if argv[:2] == ["dcv2", "train"]:
        return f"{cmd.split(' #')[0]} {SMOKE}"
    if cmd.split(" #")[0].rstrip().endswith("&"):  # a server in the background: go on once it listens
        return cmd + "\n" + WAIT_FOR_PORT
    return cmd


WAIT_FOR_PORT = ("until python -c 'import socket; socket.create_connection((\"127.0.0.1\", {PORT}), 1)' "
                 "2>/dev/null; do sleep 0.5; done")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, synth_data):
    """The scratch directory the blocks run in: /data/synth and ./mydata hold generated images already (a block
    that generates its own writes beside them), a checkpoint at runs/r50 for the export commands."""
    w = tmp_path_factory.mktemp("docs")
    (w / "data").mkdir()
    (w / "tmp").mkdir()
    os.symlink(synth_data, w / "data" / "synth")
    os.symlink(synth_data, w / "mydata")
    for name in ("manifests", "pipelines"):  # repository files the commands name by their relative path
        os.symlink(ROOT / name, w / name)
    r = subprocess.run([sys.executable, "-m", "dcv2_k8s", "train",
                        "config=pretrain/deepcluster_v2/deepclusterv2_2crops_resnet", SMOKE,
                        f"config.DATA.TRAIN.DATA_PATHS=[{synth_data / 'train'}]", "config.CHECKPOINT.DIR=runs/r50"],
                       cwd=w, env=child_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return w


@pytest.mark.slow
@pytest.mark.parametrize("where,block", [pytest.param(*b, id=b[0]) for b in BLOCKS if _kind(b[1]) == "run"])
def test_documented_block_runs(where, block, scratch):
    port = _free_port()
    lines = [c for c in (_rewrite(c) for c in _commands(block)) if c]
    if not lines:
        pytest.skip(f"{where}: every command of this block is run by another test")
    script = "\n".join(lines)
    for old, new in REWRITES:  # into a marker first: the scratch directory may itself lie under /tmp/
        script = script.replace(old, new.format(W="\0W\0", PORT=port))
    script = script.replace("\0W\0", str(scratch)).replace("{PORT}", str(port))
    # synth writes into a directory of its own when the block generates data (the shared one is read-only here)
    script = script.replace(f"dcv2 data synth {scratch}/data/synth", f"dcv2 data synth {scratch}/data/synth-new")
    env = child_env({"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    # output to a file, not a pipe: a server the block starts in the background keeps a pipe open after the end
    with open(scratch / "block.log", "w+") as log:
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=scratch, env=env, text=True,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=900)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the block's process group: a server it left running
            except ProcessLookupError:
                pass
        log.seek(0)
        out = log.read()
    assert proc.returncode == 0, f"{where} failed as run:\n{script}\n--- output ---\n{out[-4000:]}"
