"""The user-facing docs: README size, every relative link and anchor resolves, no internal notes cited."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_LIMIT = 15_000
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|<img[^>]*\ssrc=\"([^\"]+)\"")
# the internal design notes' name, spelled so that this file does not contain it
INTERNAL_NOTES = "DES" + "IGN.md"


def doc_files() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def links(text: str) -> list[str]:
    """The targets of Markdown links / images and HTML ``<img src>`` in ``text``, outside code."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [a or b for a, b in LINK.findall(text)]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    """Every heading anchor of a Markdown file (code blocks excluded)."""
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)
    return {github_slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M)}


def test_link_helpers_find_links_and_slugs():
    text = ("see [a](docs/x.md#the-users-path) and ![b](img.png) <img src=\"p.png\" width=3>\n"
            "`[not](code.md)`\n```\n[nor](block.md)\n```\n[web](https://example.com)")
    assert links(text) == ["docs/x.md#the-users-path", "img.png", "p.png", "https://example.com"]
    assert github_slug("The user's path") == "the-users-path"
    assert github_slug("What was measured: the training history") == (
        "what-was-measured-the-training-history")
    assert github_slug("The prior of L_ICA and L_AUG") == "the-prior-of-l_ica-and-l_aug"


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8"))
    assert n <= README_LIMIT, f"README.md has {n} characters (limit {README_LIMIT}); move detail to docs/"


@pytest.mark.parametrize("md", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md: Path):
    bad = []
    for target in links(md.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not bad, f"{md.relative_to(ROOT)}: " + "; ".join(bad)


def test_readme_links_every_doc_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(text)}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_no_file_cites_the_internal_design_notes():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    hits = []
    for name in filter(None, files):
        p = ROOT / name
        if not p.is_file() or p.stat().st_size > 2_000_000:
            continue
        data = p.read_bytes()
        if INTERNAL_NOTES.encode() in data:
            hits.append(name)
    assert not hits, f"files citing {INTERNAL_NOTES}: {hits}"
