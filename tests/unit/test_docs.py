"""The documentation says what the code does: every drafter field and
environment variable the plugin reads is documented, every relative link
resolves, and the data-flow figure can be redrawn."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [
    *sorted(DOCS.glob("*.md")),
    DOCS / "benchmarks" / "README.md",
    ROOT / "README.md",
    ROOT / "patches" / "README.md",
]


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_configuration_names_every_drafter_field_the_plugin_reads() -> None:
    source = read(ROOT / "vllm_dflash" / "config.py")
    fields = set(re.findall(r'_get\((?:hf|dflash), "(\w+)"', source))
    fields |= set(re.findall(r'_draft_value\(hf, "(\w+)"', source))
    assert {"mask_token_id", "target_layer_ids", "block_size"} <= fields
    page = read(DOCS / "configuration.md")
    missing = sorted(
        f for f in fields if not re.search(rf"`[\w.]*\b{f}\b[\w.]*`", page)
    )
    assert not missing, f"docs/configuration.md does not document {missing}"


def test_configuration_names_every_environment_variable() -> None:
    names = set(re.findall(r"VLLM_DFLASH_\w+", read(ROOT / "vllm_dflash" / "envs.py")))
    assert names
    page = read(DOCS / "configuration.md")
    assert all(f"`{n}`" in page for n in names), names


def _slug(heading: str) -> str:
    # GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> "-".
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", read(path), flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    links = re.findall(r"\]\(([^)\s]+)\)", read(page))
    broken = []
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        bad_anchor = bool(anchor) and path.suffix == ".md" and path.exists()
        if not path.exists() or (bad_anchor and anchor not in _anchors(path)):
            broken.append(link)
    assert not broken, f"{page.name}: {broken}"


def test_docs_pages_exist_and_are_linked_from_readme() -> None:
    readme = read(ROOT / "README.md")
    for name in ("architecture", "configuration", "compatibility", "troubleshooting"):
        assert (DOCS / f"{name}.md").exists()
        assert f"docs/{name}.md" in readme
    assert "docs/benchmarks/" in readme


def test_dataflow_figure_redraws(tmp_path: Path) -> None:
    assert "dataflow.png" in read(DOCS / "architecture.md")
    out = tmp_path / "dataflow.png"
    proc = subprocess.run(
        [sys.executable, str(DOCS / "make_dataflow_figure.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 50_000
