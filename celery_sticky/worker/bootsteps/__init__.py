"""Worker bootsteps: each a thin adapter that starts and stops one service.

``Sticky`` (:mod:`.node`) registers the node, heartbeats, owns the per-key gate
and drains at shutdown; ``Sticky reaper``, ``Sticky passivation`` and ``Sticky
metrics`` start their services when their settings ask for them
(``include_if``); ``Sticky gate`` (:mod:`.gate`) is the consumer step that tells
the gate about broker reconnects. :mod:`celery_sticky.producer.install` adds them
to an app by name; ``celery graph bootsteps`` draws them.
"""
