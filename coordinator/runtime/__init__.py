"""The coordinator's IO shell: everything that awaits.

- ``daemon``   ``Coordinator``: the node table fed from the bus, its events, and the API served.

May import ``protocol``, ``coordinator.errors``, the core, the strategies and ``api``; never the
CLI or ``dev``. ``nats`` only through ``protocol.bus``.
"""
