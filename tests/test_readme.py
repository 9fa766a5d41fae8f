"""The Python blocks of README.md and docs/*.md run as written (issue 19): offline, tiny models, local folders.

A ```python block runs unless the line before it is `<!-- not run: REASON -->` (a Hub id, a running server, a
slow export that its own test covers). The runnable blocks of one page run in order in one namespace, in an
empty folder, as a reader pasting them one after the other would; a block that raises fails the test and the
traceback names the page and line. Blocks that do not run are still compiled, so they stay valid Python.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```$", re.M | re.S)
NOT_RUN = re.compile(r"^<!-- not run: (.+?) -->$", re.M)  # on a line of its own
# Extras that a block may use; without them installed its page is skipped, as their own tests are.
OPTIONAL = {"peft", "trl", "lm_eval", "onnx", "onnxscript", "onnxruntime", "openai"}


def python_blocks(page: str) -> list[tuple[int, str, str | None]]:
    """(line of the opening fence, code, reason it is not run or None) for each ```python block of `page`."""
    text = (ROOT / page).read_text(encoding="utf-8")
    blocks = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        reason = NOT_RUN.fullmatch(before)
        blocks.append((line, m.group(1), reason.group(1) if reason else None))
    return blocks


def test_every_page_has_a_python_block_or_none_is_expected():
    # Catches a fence the pattern misses (```py, an indented fence): those would silently not be run.
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        assert len(re.findall(r"^```py", text, re.M)) == len(python_blocks(page)), page


def test_every_not_run_marker_stands_before_a_python_block():
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        markers = len(NOT_RUN.findall(text))
        assert markers == sum(1 for *_, reason in python_blocks(page) if reason), page


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)])
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for line, code, reason in python_blocks(page):
        compiled = compile(code, f"{page}:{line}", "exec")  # ```python is on `line`, the code starts after it
        if reason:
            continue
        try:
            exec(compiled, namespace)
        except ModuleNotFoundError as e:
            if e.name not in OPTIONAL:
                raise
            pytest.skip(f"{page}:{line} needs {e.name} (pip install -e '.[dev,ecosystem]')")
