"""Redis clients for the lease store: plain, TLS, ACL users, or through Sentinel.

``sticky_redis_url`` takes what redis-py takes (``redis://``, ``rediss://`` for TLS,
``unix://``; a user and password for an ACL user: ``rediss://user:pass@host:6380/0``;
TLS options as query arguments: ``?ssl_ca_certs=/path/ca.pem``), and Sentinel URLs
in the form Celery's broker uses::

    sentinel://[:password@]host:26379[;sentinel://host2:26379...][/db]?master_name=mymaster

The password (and user) of a ``sentinel://`` URL are the master's; the sentinels'
own password, if any, is the ``sentinel_password`` query argument. Without
``master_name`` in the URL the ``master_name`` of ``broker_transport_options`` is
used (how Celery users already configure Sentinel; see
:func:`celery_sticky.settings.resolve_redis_url`). A client made through Sentinel
asks the sentinels for the master on every new connection, so after a failover
the next call (once the old connection failed, which the lease store reports as
unavailable for a moment) reaches the new master.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "sentinel://"


class SentinelURL:
    """The parts of a ``sentinel://`` URL (one or more, joined by ``;``)."""

    def __init__(self, url: str) -> None:
        self.hosts: list[tuple[str, int]] = []
        self.username: str | None = None
        self.password: str | None = None
        self.db = 0
        query: dict[str, list[str]] = {}
        for part in url.split(";"):
            part = part.strip()
            if not part:
                continue
            if not part.startswith(SENTINEL_SCHEME):
                raise ValueError(f"{part!r} is not a sentinel:// URL")
            parts = urlsplit(part)
            self.hosts.append((parts.hostname or "127.0.0.1", parts.port or 26379))
            if parts.username:
                self.username = unquote(parts.username)
            if parts.password:
                self.password = unquote(parts.password)
            if parts.path.strip("/"):
                self.db = int(parts.path.strip("/"))
            query.update(parse_qs(parts.query))
        if not self.hosts:
            raise ValueError("no sentinel host in the URL")
        self.master_name = (query.get("master_name") or [""])[0]
        self.sentinel_password = (query.get("sentinel_password") or [""])[0] or None


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME)


def connect(url: str, **options: Any) -> redis.Redis:
    """A client for ``url`` with redis-py ``options`` (timeouts, decode_responses)."""
    if not is_sentinel(url):
        client: redis.Redis = redis.Redis.from_url(url, **options)
        return client
    parsed = SentinelURL(url)
    if not parsed.master_name:
        raise ValueError("a sentinel:// URL needs ?master_name=<name>")
    sentinel_kwargs: dict[str, Any] = {
        "socket_connect_timeout": options.get("socket_connect_timeout", 2),
        "socket_timeout": options.get("socket_connect_timeout", 2),
    }
    if parsed.sentinel_password:
        sentinel_kwargs["password"] = parsed.sentinel_password
    sentinel = Sentinel(parsed.hosts, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        parsed.master_name,
        db=parsed.db,
        username=parsed.username,
        password=parsed.password,
        **options,
    )
    return master
