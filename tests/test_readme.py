"""README.md agrees with the files it points to: the custom-loop block is the whole of
examples/custom_loop.py (so it runs as shown), the notebooks line names a front end the
``notebooks`` extra installs, and every example script's ``--help`` prints its description whole.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def without_docstring(path: Path) -> str:
    source = path.read_text()
    docstring = ast.parse(source).body[0]
    assert isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant), path
    return "\n".join(source.splitlines()[docstring.end_lineno :]).strip("\n")


def test_custom_loop_block_is_the_whole_example() -> None:
    (match,) = re.finditer(
        r"^<!-- custom-loop: (\S+) -->\n```python\n(.*?)^```$", README, re.MULTILINE | re.DOTALL
    )
    path, block = ROOT / match.group(1), match.group(2).strip("\n")
    assert block == without_docstring(path), f"README.md's block differs from {path.name}"


def test_notebooks_line_is_served_by_the_notebooks_extra() -> None:
    (command,) = re.findall(r"`(jupyter \w+ examples/notebooks)`", README)
    assert (ROOT / "examples" / "notebooks").is_dir()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    names = {re.split(r"[<>=\[ ]", spec)[0].lower() for spec in extras["notebooks"]}
    front_end = {"jupyter lab": "jupyterlab", "jupyter notebook": "notebook"}[
        command.rsplit(" ", 1)[0]
    ]
    assert {front_end, "ipywidgets", "ipykernel"} <= names, names
    assert re.search(r'pip install -e "\.\[[^"]*notebooks', README), "README installs the extra"


SCRIPTS = ["r3_demo.py", "train_grpo.py", "r3_experiment.py", "sft_addition.py"]
HELP = textwrap.dedent(
    """
    import contextlib, io, json, runpy, sys
    helps = {}
    for script in sys.argv[1:]:
        sys.argv = [script, "--help"]
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            runpy.run_path(script, run_name="__main__")
        helps[script] = out.getvalue()
    print(json.dumps(helps))
    """
)


def test_example_help_prints_the_whole_description() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    paths = [str(ROOT / "examples" / name) for name in SCRIPTS]
    result = subprocess.run(
        [sys.executable, "-c", HELP, *paths], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    helps = json.loads(result.stdout.strip().splitlines()[-1])
    for path in paths:
        first_paragraph = ast.get_docstring(ast.parse(Path(path).read_text())).split("\n\n")[0]
        flat_help = " ".join(helps[path].split())
        assert " ".join(first_paragraph.split()) in flat_help, (path, helps[path][:400])
        assert "usage:" in helps[path]
