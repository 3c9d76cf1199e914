"""The generated Grafana dashboard type-checked by tsc against Grafana's own schema (@grafana/schema, tests/grafana)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from dcv2_k8s import dashboard
from tests.conftest import ROOT

GRAFANA = ROOT / "tests" / "grafana"  # package.json + package-lock.json; `make test` runs `npm ci` here
SCHEMA = GRAFANA / "node_modules" / "@grafana" / "schema"
TSC = GRAFANA / "node_modules" / ".bin" / "tsc"


def _panel_modules() -> dict[str, tuple[str, Path]]:
    """Each panel type the package describes: its import specifier and its declaration file."""
    exports = json.loads((SCHEMA / "package.json").read_text())["exports"]
    out = {}
    for sub, target in exports.items():
        m = re.fullmatch(r"\./dist/esm/raw/composable/(\w+)/panelcfg/x/\w+_types\.gen", sub)
        if m:
            out[m.group(1)] = ("@grafana/schema" + sub[1:], SCHEMA / target["types"])
    return out


def _filled_on_load(specifiers: dict[str, str]) -> dict[str, list[str]]:
    """The keys of each panel type's `defaultOptions` (what Grafana merges into a panel's options on load), read
    from the package's own modules."""
    script = ("const out = {}; for (const [t, s] of Object.entries(JSON.parse(process.argv[1]))) "
              "out[t] = Object.keys((await import(s)).defaultOptions ?? {}); console.log(JSON.stringify(out));")
    done = subprocess.run(["node", "--input-type=module", "-e", script, json.dumps(specifiers)], cwd=GRAFANA,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def typescript_of(board: dict) -> str:
    """The dashboard as a TypeScript object literal that `satisfies` Grafana's Dashboard, each panel's options
    and field config typed by its panel type (tests/grafana/check.ts)."""
    modules = _panel_modules()
    kinds = sorted({p["type"] for p in board.get("panels", [])})
    missing = [k for k in kinds if k not in modules]
    assert not missing, f"@grafana/schema describes no panel type {missing}"
    filled = _filled_on_load({k: modules[k][0] for k in kinds})
    lines = ['import type { AsJson, CheckedDashboard, PanelOf } from "../check";']
    union = []
    for i, kind in enumerate(kinds):
        spec, decl = modules[kind]
        lines.append(f'import type * as P{i} from "{spec}";')
        custom = f"P{i}.FieldConfig" if re.search(r"export interface FieldConfig\b", decl.read_text()) \
            else "Record<string, unknown>"
        keys = " | ".join(json.dumps(k) for k in filled[kind]) or "never"
        union.append(f'PanelOf<"{kind}", P{i}.Options, {custom}, {keys}>')
    lines.append("type Panels = " + (" | ".join(union) or "never") + ";")
    lines.append(f"export const dashboard = {json.dumps(board, indent=1)} satisfies AsJson<CheckedDashboard<Panels>>;")
    return "\n".join(lines) + "\n"


def tsc(board: dict) -> tuple[int, list[tuple[str, str]]]:
    """tsc --noEmit on the dashboard, in a folder of its own under tests/grafana (removed after): its exit status
    and its errors, each as (message, the source line it points at)."""
    assert TSC.exists(), f"{TSC} is missing: run `make test` (it runs npm ci in tests/grafana)"
    work = Path(tempfile.mkdtemp(prefix=".check-", dir=GRAFANA))
    try:
        source = typescript_of(board)
        (work / "dashboard.ts").write_text(source)
        (work / "tsconfig.json").write_text(json.dumps({"extends": "../tsconfig.json", "files": ["dashboard.ts"]}))
        done = subprocess.run([str(TSC), "-p", str(work / "tsconfig.json"), "--pretty", "false"], cwd=GRAFANA,
                              capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = source.splitlines()
    errors = [(m.group(2), lines[int(m.group(1)) - 1])
              for m in re.finditer(r"^\S*dashboard\.ts\((\d+),\d+\): (error TS\d+: .*)$", done.stdout, re.M)]
    assert done.returncode == 0 or errors, done.stdout + done.stderr
    return done.returncode, errors


def test_dashboard_satisfies_grafana_schema():
    rc, errors = tsc(dashboard.render())
    assert rc == 0 and not errors, "\n".join(f"{msg}\n    at: {line.strip()}" for msg, line in errors)


def _no_h(board):
    del board["panels"][0]["gridPos"]["h"]


def _unknown_top_level(board):
    board["refreshEvery"] = "30s"


def _wrong_type(board):
    board["panels"][0]["gridPos"]["w"] = "8"


def _unknown_legend_mode(board):
    board["panels"][0]["options"]["legend"]["displayMode"] = "grid"


def _stat_calcs_not_a_list(board):  # a stat panel's own option (timeseries has no reduceOptions)
    stat = next(p for p in board["panels"] if p["type"] == "stat")
    stat["options"]["reduceOptions"]["calcs"] = "lastNotNull"


@pytest.mark.parametrize("mistake, named", [
    (_no_h, "Property 'h' is missing"), (_unknown_top_level, '"refreshEvery"'), (_wrong_type, '"w"'),
    (_unknown_legend_mode, '"grid"'), (_stat_calcs_not_a_list, "calcs: string;")])
def test_schema_check_rejects_a_mistake(mistake, named):
    board = copy.deepcopy(dashboard.render())
    mistake(board)
    rc, errors = tsc(board)
    assert rc != 0 and any(named in msg or named in line for msg, line in errors), errors


def test_docs_name_the_pinned_grafana_major():
    pinned = json.loads((GRAFANA / "package.json").read_text())["devDependencies"]["@grafana/schema"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned), "pin one exact release (the lock file holds it too)"
    assert f"Grafana {pinned.split('.')[0]}" in (ROOT / "docs" / "metrics.md").read_text()
