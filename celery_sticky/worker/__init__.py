"""The worker side: what runs inside ``celery worker`` processes.

Bootsteps (:mod:`.bootsteps`, thin adapters named by string from
:mod:`celery_sticky.producer.install`) start the services: the node's
registration, heartbeat and proofs (:mod:`.node`), the per-key gate in the main
process (:mod:`.gate`), forwarding (:mod:`.forwarding`), the reaper
(:mod:`.reaper`), the drain (:mod:`.drain`), passivation (:mod:`.passivation`)
and remote control (:mod:`.control`). In the pool, every sticky task runs the
per-task protocol of :mod:`.execution`; moves (:mod:`.moves`) and the outbox
(:mod:`.outbox`) are its helpers. The worker imports the producer side (a
worker publishes too), never the reverse.
"""
