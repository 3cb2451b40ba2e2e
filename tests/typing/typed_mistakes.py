"""Calls mypy must reject (tests/test_typing.py checks each error's line)."""

from __future__ import annotations

from tests.typing.typed_tasks import add_item, summarize

add_item.delay("o-1")  # error: missing sku
add_item.delay("o-1", 7)  # error: sku is a str
add_item.delay("o-1", "sku", colour="red")  # error: no such parameter
total: str = summarize("a b")  # error: returns dict[str, int]

reveal_type(add_item.delay)  # noqa: F821
reveal_type(summarize)  # noqa: F821
