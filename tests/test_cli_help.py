"""What a user reads: every subcommand's --help (positionals explained, defaults shown), counts in singular and
plural, and the file names `dcv2 report` writes."""

from __future__ import annotations

import argparse
import json
import re

from dcv2_k8s import plural, report
from dcv2_k8s.cli import build_parser
from tests.conftest import run_cli


def _parsers(parser: argparse.ArgumentParser, name: str = "dcv2"):
    """The parser and every subcommand's, by their command line."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _parsers(p, f"{name} {sub}")


def test_every_positional_of_every_subcommand_has_a_help():
    missing = [f"{name}: {a.dest}" for name, p in _parsers(build_parser()) for a in p._actions
               if not a.option_strings and not isinstance(a, argparse._SubParsersAction) and not (a.help or "").strip()]
    assert not missing, missing


def test_help_shows_every_default_that_is_not_off():
    """An option with a default (not off, empty or None) says it in --help, as "(default: X)" or in its own
    words."""
    unshown = []
    for name, p in _parsers(build_parser()):
        text = " ".join(p.format_help().split())
        for a in p._actions:
            if a.help in (None, argparse.SUPPRESS) or a.default is False or a.default in (None, "", []) \
                    or isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if f"(default: {a.default})" not in text and "default" not in a.help.lower():
                unshown.append(f"{name} {a.option_strings or a.dest}")
    assert not unshown, unshown
    out = run_cli("data", "synth", "--help", timeout=120).stdout
    assert "number of classes (default: 10)" in " ".join(out.split())


def test_counts_are_singular_for_one():
    assert [plural.count(n, "image") for n in (0, 1, 2)] == ["0 images", "1 image", "2 images"]
    assert [plural.count(n, "process") for n in (1, 3)] == ["1 process", "3 processes"]
    assert plural.count(1, "index", "indices") == "1 index" and plural.count(2, "index", "indices") == "2 indices"


def test_staging_progress_line_counts_one_object_and_one_file():
    import io

    from dcv2_k8s.data.progress import Progress

    prog = Progress(total_bytes=10, objects=1, tty=False, every=0, out=io.StringIO())
    prog.add(nbytes=10, files=1, objects=1)
    assert prog.line().startswith("stage: 1/1 object, 1 file, ")


def test_report_file_names_hold_no_colon(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    side = {"mean_cosine": 0.2, "effective_rank": 12.0}
    events = [{"kind": "step", "epoch": e, "global_step": 10 * e + 10, "loss": 3.4 - 0.1 * e, "lr": 0.1,
               "images_per_s": 100.0, "data_wait_ratio": 0.05} for e in range(3)]
    events += [{"kind": "diagnostics", "epoch": e, "trunk": side, "embedding": side,
                "weight_change": {"layer1": {"per_epoch": 0.01}}} for e in range(3)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(e) for e in events))
    report.render(str(run), str(tmp_path / "out"))
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert any("representation_mean_pairwise_cosine" in n for n in names), names  # its title has a ':'
    assert all(re.fullmatch(r"\d\d_[a-z0-9-]+(_[a-z0-9-]+)*\.png", n) for n in names), names
    assert report.png_name(4, "Cluster-size entropy / log K") == "04_cluster-size_entropy_log_k.png"
