"""The repository's promises: README's commands, CI running exactly the README's test command."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    """The resnet50 report pasted in the README carries the figures the report computes."""
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
