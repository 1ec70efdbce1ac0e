"""The README's promises about its own commands: `.ci/run` runs exactly its set-up and test commands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_exactly_the_readmes_setup_and_test_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    install, tests = _bash_blocks(readme)[:2]
    commands = [c.strip() for c in install.strip().split("&&") if not c.strip().startswith("negmonitor ")]
    commands += [tests.strip()]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci == commands
