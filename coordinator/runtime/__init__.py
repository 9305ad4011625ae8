"""The coordinator's IO shell: everything that awaits.

- ``daemon``    ``Coordinator``: the node table fed from the bus, its events, the API served, the
                runner started.
- ``runner``    ``Runner``: drives every live rollout (feeds, operator requests, resuming); owns
                one of each of the objects below.
- ``driver``    one live rollout, and the node progress it may hold back from persisting.
- ``executor``  carries out an engine step: persist, then desired writes, then events.
- ``store``     ``RolloutStore``: rollout records and per-service locks in KV.
- ``desired``   ``DesiredWriter``: signed desired states, forward by generation only.
- events go out through ``protocol.events.EventPublisher``, the one event queue and retry
  policy the agent uses too.
- ``calls``     bounded bus calls and the retry of commands; ``ports``: what all this needs of
                the bus; ``keyfile``: the signing key on disk (and a rotation's files).
- ``rotation``  a rotation on the bus: a new leader's re-signing, and where a rotation stands.

May import ``protocol``, ``coordinator.errors``, the core, the strategies and ``api``; never the
CLI or ``dev``. ``nats`` only through ``protocol.bus``.
"""
