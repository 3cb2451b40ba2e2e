"""URLs in messages and logs: passwords masked (kombu's ``maybe_sanitize_url``)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from kombu.utils.url import maybe_sanitize_url


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***``, for error messages and logs.

    A thin wrapper of kombu's ``maybe_sanitize_url(url, mask="***")`` that also
    takes the ``;``-separated lists Celery accepts for failover (``sentinel://``),
    and never raises: a URL kombu cannot parse is masked whole.
    """
    parts = url.split(";")
    try:
        return ";".join(_mask_query(str(maybe_sanitize_url(p.strip(), mask="***"))) for p in parts)
    except ValueError:
        return "***" if "@" in url else url


def _mask_query(url: str) -> str:
    """Query arguments naming a password (``sentinel_kwargs`` style) masked too."""
    parts = urlsplit(url)
    if not parts.query or "password" not in parts.query:
        return url
    query = "&".join(
        f"{name}=***" if "password" in name else f"{name}{sep}{value}"
        for name, sep, value in (item.partition("=") for item in parts.query.split("&"))
    )
    return urlunsplit(parts._replace(query=query))
