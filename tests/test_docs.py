"""The documentation: README.md is the front page, docs/ + mkdocs.yml the site. The site builds strictly (a broken
link or anchor, or a page missing from the navigation, fails the build: mkdocs.yml's `validation` makes each a
warning and `--strict` turns warnings into a failure), and README.md stays short and links every page."""
import re
import subprocess
import sys
from pathlib import Path

import yaml
from markdown.extensions.toc import slugify

from tests.conftest import ROOT
DOCS = ROOT / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _config_copy(tmp_path: Path, drop: str | None = None) -> Path:
    """mkdocs.yml with ``drop`` left out of the nav, written to ``tmp_path`` (paths made absolute)."""
    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    cfg["docs_dir"] = str(DOCS)
    cfg["hooks"] = [str(ROOT / h) for h in cfg.get("hooks", [])]
    nav = [entry for entry in cfg["nav"] if drop not in entry.values()]
    assert len(nav) == len(cfg["nav"]) - (drop is not None)
    cfg["nav"] = nav
    path = tmp_path / f"mkdocs-{drop or 'all'}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_site_builds_strictly(tmp_path):
    p = _mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert p.returncode == 0, p.stdout + p.stderr
    for page in PAGES:  # every page rendered; the benchmark results the pages link came along
        name = page[:-3]
        assert (tmp_path / "site" / ("index.html" if name == "index" else f"{name}/index.html")).is_file(), page
    assert (tmp_path / "site" / "benchmarks" / "results" / "stage_cpu" / "index.html").is_file()


def test_a_page_missing_from_the_nav_fails_the_build(tmp_path):
    """The check above is not vacuous: the same configuration builds, and fails once a page is left out."""
    ok = _mkdocs_build(_config_copy(tmp_path), tmp_path / "site-all")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = _mkdocs_build(_config_copy(tmp_path, drop="testing.md"), tmp_path / "site-drop")
    assert bad.returncode != 0
    assert 'not included in the "nav"' in bad.stderr and "testing.md" in bad.stderr, bad.stderr


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {slugify(m.group(1).replace("`", ""), "-") for m in re.finditer(r"^#+\s+(.+?)\s*$", text, re.M)}


def test_readme_is_the_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split()[:2] for line in first_block] == [["make", "demo"], ["make", "test"]]
    links = re.findall(r"\]\(([^)\s#]+)(?:#([^)\s]+))?\)", readme)
    linked = {target for target, _ in links}
    assert {f"docs/{page}" for page in PAGES} <= linked, "README.md must link every docs page"
    for target, anchor in links:  # every relative link and anchor resolves
        if "://" in target:
            continue
        assert (ROOT / target).exists(), target
        if anchor:
            assert anchor in _anchors(ROOT / target), f"{target}#{anchor}"
