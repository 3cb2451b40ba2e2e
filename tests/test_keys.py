"""Key specs: where a task finds its key (no Redis, no workers needed)."""

from __future__ import annotations

from typing import Any

import pytest

from celery_sticky.keys import KeySpec, normalize_key


def test_positional_and_keyword_key() -> None:
    def step(order_id: str, sku: str, *, state: Any) -> None: ...

    spec = KeySpec.for_function(step, "order_id", None, bind=False)
    assert (spec.workflow, spec.arg_index, spec.wants_state) == ("order_id", 0, True)
    assert spec.extract(("o1", "s"), {}, task_name="t") == "o1"
    assert spec.extract((), {"order_id": "o2", "sku": "s"}, task_name="t") == "o2"


def test_bound_task_skips_self() -> None:
    def step(self: Any, sku: str, order_id: str) -> None: ...

    spec = KeySpec.for_function(step, "order_id", "orders", bind=True)
    assert (spec.workflow, spec.arg_index, spec.wants_state) == ("orders", 1, False)
    assert spec.extract(("s", 42), {}, task_name="t") == "42"


def test_keyword_only_key() -> None:
    def step(sku: str, *, order_id: str) -> None: ...

    spec = KeySpec.for_function(step, "order_id", None, bind=False)
    assert spec.arg_index is None
    assert spec.extract(("s",), {"order_id": "o"}, task_name="t") == "o"


def test_callable_key_errors_are_named() -> None:
    def step(a: int, b: int) -> None: ...

    spec = KeySpec.for_function(step, lambda a, b: 1 / 0, "w", bind=False)
    with pytest.raises(ValueError, match="key function raised ZeroDivisionError"):
        spec.extract((1, 2), {}, task_name="t")


def test_normalize_key() -> None:
    assert normalize_key(17, task_name="t", source="s") == "17"
    with pytest.raises(ValueError, match="bytes"):
        normalize_key(b"x", task_name="t", source="s")


def test_var_args_cannot_be_keys() -> None:
    def step(*keys: str) -> None: ...

    with pytest.raises(TypeError, match=r"\*args/\*\*kwargs"):
        KeySpec.for_function(step, "keys", None, bind=False)


def test_a_key_that_cannot_be_encoded_is_refused_at_publish() -> None:
    """A lone surrogate (from a bad decode) fails as InvalidKeyError, shown with escapes."""
    from celery import Celery

    from celery_sticky import sticky_task
    from celery_sticky.errors import InvalidKeyError

    with pytest.raises(InvalidKeyError, match=r"not valid Unicode text .*'k\\ud800'") as raised:
        normalize_key("k\ud800", task_name="t", source="s")
    str(raised.value).encode("utf-8")  # the message itself can be printed and logged

    app = Celery("keys", broker="memory://", set_as_current=False)
    app.conf.update(sticky_redis_url="redis://127.0.0.1:1/0")

    @sticky_task(app=app, key="order_id")
    def step(order_id: str) -> None: ...

    with pytest.raises(InvalidKeyError, match="not valid Unicode"):
        step.delay("order-\udcff")
