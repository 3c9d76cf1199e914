"""MkDocs hook (mkdocs.yml `hooks:`): the pages link benchmark results where they live, by their path in the
repository (`../benchmarks/results/stage_cpu.md` from docs/), which is right on GitHub and in a checkout. MkDocs only
knows the files under docs/, so this hook adds the files of SHARED to the site (Markdown ones as pages outside the
navigation, the rest as static files) and points those links at them. A link to any other file outside docs/ is
left as written, and the strict build fails on it, as on a link to a results file that does not exist."""
from __future__ import annotations

import os
import posixpath
import re

from mkdocs.structure.files import File, InclusionLevel

SHARED = ("benchmarks/results",)  # folders of the repository that the site carries too
_LINK = re.compile(r"(\]\()([^)\s#]+)(#[^)\s]*)?(\))")  # [text](path#anchor)


def _root(config) -> str:
    return os.path.dirname(os.path.abspath(config.docs_dir))  # the repository: docs/ is at its top


def on_files(files, config):
    root = _root(config)
    for folder in SHARED:
        for dirpath, _, names in os.walk(os.path.join(root, folder)):
            for name in sorted(names):
                rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
                files.append(File(rel, root, config.site_dir, config.use_directory_urls,
                                  inclusion=InclusionLevel.NOT_IN_NAV))
    return files


def on_page_markdown(markdown, page, config, files):
    docs = os.path.relpath(config.docs_dir, _root(config)).replace(os.sep, "/")
    here = posixpath.dirname(page.file.src_uri)

    def to_site(m: re.Match) -> str:
        path = m.group(2)
        target = posixpath.normpath(posixpath.join(docs, here, path))  # relative to the repository root
        if not path.startswith("../") or not target.startswith(tuple(f + "/" for f in SHARED)):
            return m.group(0)
        return m.group(1) + posixpath.relpath(target, here or ".") + (m.group(3) or "") + m.group(4)

    return _LINK.sub(to_site, markdown)
