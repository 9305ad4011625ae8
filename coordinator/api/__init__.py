"""The coordinator's request/reply API on the bus (``fw.<fleet>.api.<verb>``).

- ``verbs``    the verb table: one codec path per request, every failure an ``ApiReply`` error.
- ``rollouts`` the rollout verbs (deploy, status, pause, ..., rollback, key) over the runner.

May import ``protocol``, ``coordinator.errors`` and the core; never the runtime, the CLI,
``dev`` or ``nats``. The daemon (``coordinator.runtime.daemon``) registers these verbs and serves
them.
"""
