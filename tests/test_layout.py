"""The floor plan: imports that run one way (no cycle, not even behind TYPE_CHECKING or inside a function),
documentation whose relative links and images all resolve, and the one outside file the tests use found as a
user's run finds it."""

import ast
import re
from pathlib import Path

import tiktoken.load

from tests import conftest
from tests.conftest import R50K_CACHE_NAME, R50K_URL, REPO

SOURCES = [*REPO.glob("*.py"), *REPO.glob("glimpse/*.py"), *REPO.glob("data/*.py"), *REPO.glob("scripts/*.py")]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The project's modules that path imports anywhere in it (top level, functions, TYPE_CHECKING blocks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from data import hellaswag` imports the module data.hellaswag, `from model import GPT` model
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found - {module_name(path)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph as [a, b, ..., a], or None."""
    state = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_imports_run_one_way():
    modules = {module_name(p) for p in SOURCES}
    graph = {module_name(p): imports(p, modules) for p in SOURCES}
    assert graph["model"] >= {"glimpse.generation", "glimpse.positions"}  # the walk finds real imports
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # and would find one


def test_every_relative_link_and_image_in_the_docs_resolves():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    checked, broken = 0, []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # code blocks are not links
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto: ... : not files
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            checked += 1
            if not resolved.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
            elif anchor and resolved.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", resolved.read_text(encoding="utf-8"), flags=re.M)
                slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
                if anchor not in slugs:
                    broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert checked > 5, "the README and docs link to their pages and pictures"
    assert not broken, "broken links: " + ", ".join(broken)


def test_gpt2_tests_get_the_bpe_ranks_as_tiktoken_does_or_say_why_not(tmp_path, monkeypatch):
    """Without the shared copy and with nothing cached, the GPT-2 tests take the ranks through tiktoken's download,
    as a user's run would, and skip only when tiktoken cannot get them, with its error as the reason. The download
    itself is tiktoken's read_file, made to fail and to succeed here whatever this machine's network does."""
    monkeypatch.setattr(conftest, "GPT2_RANKS", tmp_path / "no-shared-copy")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))

    def offline(url: str) -> bytes:
        raise ConnectionError(f"no route to {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    found, why_not = conftest.gpt2_ranks_or_why()
    assert found is None and f"tiktoken could not download them (ConnectionError: no route to {R50K_URL})" in why_not
    ranks = b"IQ== 0\nIg== 1\n"  # what the download gives: ranks in tiktoken's format
    monkeypatch.setattr(tiktoken.load, "read_file", lambda url: ranks if url == R50K_URL else offline(url))
    found, why_not = conftest.gpt2_ranks_or_why()
    assert found == tmp_path / "cache" / R50K_CACHE_NAME and found.read_bytes() == ranks and not why_not
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's cache off: the download is kept in a file of its own
    found, _ = conftest.gpt2_ranks_or_why()
    assert found.name == R50K_CACHE_NAME and found.read_bytes() == ranks
