"""The fleetwave coordinator: plans rollouts, drives them through the fleet, and serves the CLI.

    core/        pure: the rollout engine and its state tables, planning, amounts, gates, the
                 node table. Time is an input; no asyncio, no nats, no clock.
    strategies/  one module per strategy behind one ``Strategy`` Protocol, each with its typed
                 state and its own spec checks.
    runtime/     the IO shell: the daemon, the runner (rollout store, desired writes; events
                 through ``protocol.events``), the signing key file.
    api/         the request/reply verbs on the bus, over the runner (seen through a Protocol).
    cli/         ``fleetwave``: thin click commands.
    dev/         a fleet on one machine: broker, dev fleet, demo, traffic.
    errors.py    the error tree; releases.py: pushing, listing and resolving release bundles.

Imports run one way: cli → dev → runtime → api → strategies ⇄ core (the strategies use the
core's vocabulary, the engine calls the strategies) → protocol. ``python -m coordinator.daemon``
is the daemon's entry point (``coordinator/daemon.py``, which nothing imports).
"""
