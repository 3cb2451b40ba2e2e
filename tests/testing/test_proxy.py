"""The TCP proxy cuts, blackholes and restores; the test Redis server restarts with or
without its data."""

from __future__ import annotations

import os

import pytest
import redis

from celery_sticky.testing import RedisServer, TcpProxy


def client(url: str, timeout: float = 1.0) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


def test_proxy_forwards_cuts_and_restores() -> None:
    url = os.environ["STICKY_TEST_REDIS_URL"]
    with TcpProxy.to(url) as proxy:
        through = client(proxy.url(url))
        assert through.ping()
        proxy.cut()
        with pytest.raises(redis.ConnectionError):
            through.ping()
        with pytest.raises(redis.ConnectionError):
            client(proxy.url(url)).ping()  # new connections fail too
        proxy.restore()
        assert client(proxy.url(url)).ping()


def test_proxy_blackhole_holds_then_delivers() -> None:
    url = os.environ["STICKY_TEST_REDIS_URL"]
    with TcpProxy.to(url) as proxy:
        through = client(proxy.url(url), timeout=0.5)
        assert through.ping()
        proxy.blackhole()
        with pytest.raises(redis.TimeoutError):
            through.ping()
        proxy.restore()
        assert client(proxy.url(url)).ping()


def test_redis_server_restarts_with_or_without_its_data() -> None:
    with RedisServer() as server:
        client(server.url).set("kept", "1")
        server.restart(keep_data=True)
        assert client(server.url).get("kept") == b"1"
        server.restart(keep_data=False)
        assert client(server.url).get("kept") is None
