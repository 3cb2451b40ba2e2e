"""Exceptions raised by celery-sticky; each message names what is at fault."""

from __future__ import annotations

from celery.exceptions import Ignore, ImproperlyConfigured


class StickyError(Exception):
    """Base class of every celery-sticky error."""


class ConfigurationError(StickyError, ImproperlyConfigured):  # type: ignore[misc]
    """A ``sticky_*`` setting (named in the message) is wrong."""


class InvalidKeyError(StickyError, ValueError):
    """A task's workflow key is missing, ``None``, of the wrong type or too long."""


class InvalidHeaderError(StickyError, ValueError):
    """A message's ``sticky`` header is malformed (the field and value are named)."""


class LeaseStoreUnavailable(StickyError, ConnectionError):
    """The lease store (Redis, URL in the message) does not answer."""


class Fenced(Ignore):  # type: ignore[misc]
    """A task's run ended at the fence (this worker no longer holds its key): nothing
    was committed and the task was sent again, to the key's owner or its router.

    Celery treats it as :class:`~celery.exceptions.Ignore`; the gate tells it apart,
    so that a copy of the task that arrived meanwhile (the one sent again, when the
    key is still this worker's) runs instead of being acknowledged as a duplicate.
    """


class ForwardingError(StickyError):
    """A message was forwarded more often than ``sticky_max_hops`` allows."""


class StateDirError(StickyError, OSError):
    """The worker's state directory cannot be created, written or opened."""


class StateSizeLimitError(StickyError):
    """A commit would take local state past ``sticky_state_size_limit``."""


class MoveError(StickyError):
    """A key cannot be moved as asked (no such lease, worker gone, affinity)."""
