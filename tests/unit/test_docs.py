"""The docs build with MkDocs in strict mode (as `make docs` does), and the build fails on each
kind of mistake it is meant to catch; the README stays a front page whose links resolve."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT

README_MAX_LINES = 160


def mkdocs_build(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    # Never --quiet: MkDocs 1.6 then drops the warnings before strict mode counts them.
    config = root / "mkdocs.yml"
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config)]
    return subprocess.run(
        [*command, "--site-dir", str(site)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_docs_build_in_strict_mode(tmp_path: Path) -> None:
    result = mkdocs_build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "pipelines" / "index.html").is_file()


def append_to_index(line: str) -> Callable[[Path], None]:
    def mutate(docs: Path) -> None:
        with (docs / "index.md").open("a", encoding="utf-8") as index:
            index.write(f"\n{line}\n")

    return mutate


def add_orphan_page(docs: Path) -> None:
    (docs / "orphan.md").write_text("# Not in the nav\n", encoding="utf-8")


BREAKAGES = [
    (append_to_index("[gone](no-such-page.md)"), "no-such-page.md"),
    (append_to_index("[gone](pipelines.md#no-such-heading)"), "no-such-heading"),
    (append_to_index("[gone](#no-such-heading-here)"), "no-such-heading-here"),
    (append_to_index("[readme](../README.md)"), "../README.md"),
    (add_orphan_page, "orphan.md"),
]


@pytest.fixture(scope="module")
def broken_build(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    """One strict build of a copy of the docs with every breakage at once: strict mode
    reports each warning before it fails, so one build shows whether each is caught."""
    tmp = tmp_path_factory.mktemp("broken-docs")
    copy = tmp / "tree"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy2(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    for mutate, _ in BREAKAGES:
        mutate(copy / "docs")
    return mkdocs_build(copy, tmp / "site")


@pytest.mark.parametrize(
    "named",
    [named for _, named in BREAKAGES],
    ids=["missing page", "missing anchor", "missing local anchor", "outside docs", "not in nav"],
)
def test_the_strict_build_fails_on_a_broken_docs_tree(
    broken_build: subprocess.CompletedProcess[str], named: str
) -> None:
    output = broken_build.stdout + broken_build.stderr
    assert broken_build.returncode != 0, output
    assert named in output


def test_the_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_the_readme_links_resolve() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)", text)
    local = [target for target in targets if "://" not in target]
    assert local, "the README links to the docs"
    missing = [target for target in local if not (ROOT / target).is_file()]
    assert not missing, f"README.md links to missing files: {missing}"
