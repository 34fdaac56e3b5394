"""The repository's promises: README's commands, CI running exactly the README's test command, a
README short enough to read, links that lead somewhere, and no machine's paths in the files."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The pages whose links are checked: the README, the docs, the benchmarks' README.
PAGES = ["README.md", "benchmarks/README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README must open with a bash block of commands"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_two_commands_install_and_test():
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].startswith("pip install -e . && ")
    assert commands[1].startswith('pip install -e ".[test]" && ')


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in [line.strip() for line in ci]


@pytest.mark.slow
def test_quickstart_runs():
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "25,557,032 -> 28,088,024 parameters" in done.stdout


def test_readme_report_is_current():
    """The README's summary of the resnet50 report carries the figures the report computes."""
    text = (ROOT / "README.md").read_text()
    for figure in ("25,557,032", "28,088,024", "8,178,368,512", "8,183,398,400", "5,029,888"):
        assert figure in text, figure


def test_readme_option_table_names_every_option():
    from se_inject.options import option_names

    text = (ROOT / "README.md").read_text()
    table = text[text.index("| option | default | meaning |"):]
    table = table[: table.index("\n\n")]
    for name in option_names() + ["example_inputs", "inplace", "strict"]:
        assert f"`{name}`" in table, name


def test_readme_is_short():
    """The README keeps what a new user needs; the design and the measurements live in docs/."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; move the details to a page under docs/"


def _prose(text: str) -> str:
    """``text`` without its fenced code blocks (a ``# comment`` there is no heading, ``[i](x)`` no link)."""
    return re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.S | re.M)


def _anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens,
    ``-1``, ``-2`` ... after repeats."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", _prose(text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def _links(page: str) -> list[str]:
    text = _prose((ROOT / page).read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


def test_every_page_to_check_exists():
    assert "docs/README.md" in PAGES and "docs/gpu.md" in PAGES  # se_inject/fused's docstring points there
    for page in PAGES:
        assert (ROOT / page).is_file(), page


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_lead_to_files_and_headings(page):
    """Every relative link of the page points at a file or folder of the repository, and its
    ``#anchor``, if any, at a heading of the markdown page it names."""
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        file = (ROOT / page).parent / path if path else ROOT / page
        if not file.exists() or ROOT.resolve() not in [file.resolve(), *file.resolve().parents]:
            broken.append(f"{target} (no such file in the repository)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
            broken.append(f"{target} (no heading #{anchor} in {path or page})")
    assert not broken, f"{page}: " + "; ".join(broken)


def test_docs_index_and_readme_link_every_docs_page():
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    index = {t.partition("#")[0] for t in _links("docs/README.md")}
    readme = {t.partition("#")[0] for t in _links("README.md")}
    assert pages <= index, f"docs/README.md does not list {sorted(pages - index)}"
    assert {f"docs/{p}" for p in pages} <= readme, f"README.md does not link {sorted(pages)}"


#: A path on some machine: a home or a project directory of the machine the files were written on,
#: or a folder outside the repository. Written as a pattern so that this file does not match it.
MACHINE_PATH = re.compile(r"/(?:work|root|home)/|\.\./shared")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".json", ".jsonl", ".txt", ".cfg", ".ini", ".yaml", ".yml", ".sh"}


def _repository_files() -> list[Path]:
    """The tracked files (``git ls-files``); without git, every file outside hidden and build folders."""
    try:
        done = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except OSError:
        done = None
    if done is not None and done.returncode == 0 and done.stdout:
        return [ROOT / name for name in done.stdout.split("\0") if name]
    skip = ("__pycache__", "build", "dist")
    return [p for p in ROOT.rglob("*") if p.is_file() and not any(
        part.startswith(".") and part != ".ci" or part in skip or part.endswith(".egg-info")
        for part in p.relative_to(ROOT).parts)]


def test_no_file_carries_a_machine_path():
    """Measurements name the machine and the commit they come from, never where a file lay on it."""
    found = []
    for path in _repository_files():
        if not path.is_file() or (path.suffix not in TEXT_SUFFIXES and path.name not in ("run", ".gitignore")):
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not found, "\n".join(found)
