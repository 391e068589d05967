"""The README stays a front door, every link in the docs leads somewhere, and every results file
says what it was measured on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, ROOT / "benches" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULTS = ROOT / "benches" / "results"
# CI (.ci/run) runs this line of the README verbatim.
TEST_COMMAND = ('python -m pip install "torch==2.13.0" -c .ci/constraints.txt -e ".[dev]" && '
                'python -m pip install --no-deps verl==0.9.1 openrlhf==0.11.2 && python -m pytest')

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_readme_is_at_most_200_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines, expected at most 200: move reference to docs/"


def test_readme_keeps_the_test_command_ci_runs_on_one_line_in_a_bash_block():
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    assert any(TEST_COMMAND in block.splitlines() for block in blocks), \
        f"no ```bash block of README.md has the line {TEST_COMMAND!r}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        resolved = (doc.parent / file_part).resolve() if file_part else doc
        if not resolved.exists():
            broken.append(f"{target} (no file {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading with anchor #{anchor} in {resolved.name})")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {broken}"


def test_the_link_checker_sees_a_broken_link(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("# Top\n[ok](x.md#top) [bad](missing.md) [web](https://example.com)\n```\n[code](no.md)\n```\n")
    assert relative_links(doc) == ["x.md#top", "missing.md"]
    assert anchors(doc) == {"top"}


@pytest.mark.parametrize("result", sorted(RESULTS.glob("*.md")), ids=lambda p: p.name)
def test_every_results_file_records_commit_command_machine_and_versions(result):
    header = next((line for line in result.read_text().splitlines() if line.startswith("Commit `")), None)
    assert header is not None, f"{result.name} has no 'Commit `...`' provenance line"
    assert re.match(r"Commit `[0-9a-f]{7,40}(\+dirty)?`, \S+: `[^`]+` on .+; .*torch \d", header), \
        f"{result.name}: the provenance line must give the commit, date, command, machine and versions: {header!r}"
    data = result.with_suffix(".json")
    if data.exists():
        meta = json.loads(data.read_text())["metadata"]
        assert {"commit", "command", "date", "machine", "versions"} <= set(meta), f"{data.name}: {sorted(meta)}"
