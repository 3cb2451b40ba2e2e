"""Sticky tasks as a typed project writes them: mypy --strict must accept this file,
and it registers on its own app at run time."""

from __future__ import annotations

from typing import Any

from celery import Celery

from celery_sticky import INJECTED, StateHandle, sticky_task

app = Celery("typed", set_as_current=False)


@sticky_task(key="order_id", bind=True, app=app)
def add_item(
    self: Any, order_id: str, sku: str, qty: int = 1, *, state: StateHandle = INJECTED
) -> int:
    items: list[str] = state.get("items", [])
    state["items"] = [*items, *([sku] * qty)]
    return len(state["items"])


@sticky_task(key="doc", app=app)
def summarize(doc: str, *, state: StateHandle = INJECTED) -> dict[str, int]:
    return {"words": len(doc.split())}


def publish() -> None:
    add_item.delay("o-1", "sku-1")
    add_item.delay("o-1", "sku-2", qty=2)
    add_item.s("o-1", "sku-3").apply_async()
    count: int = add_item("o-1", "sku-4")  # a direct call runs the function
    words: dict[str, int] = summarize("a b c")
    print(count, words, add_item.name)
