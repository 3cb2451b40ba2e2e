"""``@sticky_task`` keeps the function's parameters and return type for type checkers."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO


def mypy(*paths: str) -> list[str]:
    flags = ["--strict", "--ignore-missing-imports", "--no-incremental", "--no-error-summary"]
    done = subprocess.run(
        [sys.executable, "-m", "mypy", *flags, "--cache-dir=/dev/null", *paths],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=240,
    )
    assert not done.stderr.strip(), done.stderr
    return done.stdout.splitlines()


def test_sticky_task_keeps_parameters_and_return_type() -> None:
    lines = mypy("tests/typing/typed_tasks.py", "tests/typing/typed_mistakes.py")
    assert not [line for line in lines if line.startswith("tests/typing/typed_tasks.py")], lines
    errors = {
        int(m.group(1)): m.group(2)
        for line in lines
        if (m := re.match(r"tests/typing/typed_mistakes\.py:(\d+): error: (.*)", line))
    }
    assert sorted(errors) == [7, 8, 9, 10], lines
    assert 'Missing positional argument "sku"' in errors[7]
    assert 'has incompatible type "int"; expected "str"' in errors[8]
    assert 'Unexpected keyword argument "colour"' in errors[9]
    assert '"dict[str, int]", variable has type "str"' in errors[10]
    revealed = [line for line in lines if "Revealed type" in line]
    # bind=True: `self` is gone; `state` stays a parameter with a default (INJECTED).
    assert "def (order_id: str, sku: str, qty: int =, *, state:" in revealed[0], revealed
    assert (
        "[[doc: str, *, state: celery_sticky.local.handle.StateHandle =], dict[str, int]]"
        in (revealed[1])
    ), revealed


def test_typed_tasks_are_sticky_at_run_time() -> None:
    from tests.typing import typed_tasks

    task = typed_tasks.app.tasks[typed_tasks.add_item.name]
    assert task.sticky.wants_state and task.sticky.arg_name == "order_id"
    assert typed_tasks.add_item.s("o-1", "sku").args == ("o-1", "sku")
