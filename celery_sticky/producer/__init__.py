"""The producer side: what runs wherever sticky tasks are published.

``@sticky_task`` and :class:`StickyTask` (:mod:`.task`), the router
(:mod:`.router`), ``install`` (:mod:`.install`), the admin API ``release`` and
``move_key`` (:mod:`.admin`), rebalance planning (:mod:`.rebalance`) and
celery-sticky's own tasks (:mod:`.own_tasks`). Nothing here imports
:mod:`celery_sticky.worker`: the worker's entry points are named by string.
"""
