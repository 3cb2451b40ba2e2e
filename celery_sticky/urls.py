"""URLs in messages and logs: passwords masked (kombu's ``maybe_sanitize_url``)."""

from __future__ import annotations

from kombu.utils.url import maybe_sanitize_url


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***``, for error messages and logs.

    A thin wrapper of kombu's ``maybe_sanitize_url(url, mask="***")`` that also
    takes the ``;``-separated lists Celery accepts for failover (``sentinel://``),
    and never raises: a URL kombu cannot parse is masked whole.
    """
    parts = url.split(";")
    try:
        return ";".join(str(maybe_sanitize_url(part.strip(), mask="***")) for part in parts)
    except ValueError:
        return "***" if "@" in url else url
