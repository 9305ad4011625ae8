"""The coordinator's pure core: decisions from inputs, with time given, never read.

- ``engine``        ``Rollout``: the rollout state machine; ``handle(event, now)`` returns commands.
  ``engine_types``  its vocabulary (events, commands) and its tables: ``ACCEPTS`` and ``MOVES``
                    for the rollout, ``WAVE_MOVES`` and ``NODE_MOVES`` for waves and nodes.
  ``engine_step``   the working step of one ``handle`` call (its primitives), with the concerns
                    composed over it: ``engine_progress``, ``engine_bake``, ``engine_rollback``.
- ``planning``      which nodes a rollout targets and the shape of its waves; ``amounts``: ``N``
                    or ``P%`` of the nodes; ``targets``: the desired state one node is given.
- ``gates``         whether a wave's figures pass its thresholds; ``gates_shadow``: a shadow's;
                    ``evidence``: which nodes' router figures may feed them.
- ``fleet``         the node table: liveness from heartbeats, the views the API lists.
- ``rotation``      a signing-key rotation: who may lead, what to re-sign, which nodes trust a key.

May import ``protocol``, ``coordinator.errors`` and the strategies (which import the core's
planning, targets, gates and evidence, and the engine's step for types only; the engine asks
each wave's policy, ``strategies.base.WavePolicy``, where waves differ); never ``asyncio``,
``nats``, the runtime, the API or the CLI, and nothing here reads the clock.
"""
