"""The fleetwave agent: one per host; runs services in slots behind a router, make-before-break.

    main.py        ``fleetwave-agent``: ``build_agent``, the run, exit codes (imports nothing
                   heavy at its top: ``lean`` keeps OpenSSL out of the agent process)
    flags.py       its flags: one table, the argparse parser, the click command built from it
    daemon.py      Agent: run the manager (its local part before NATS answers), connect,
                   register, heartbeat (``presence``)
    reconcile.py   the pure reconciler: (desired, local view, now) -> actions, and its slot table
    manager/       the async shell around it, composed by concern (desired states, routers,
                   observed states, the state file, events)
    host/          what runs on the host: slot processes, probes, the release cache, the state
                   file's format, host figures, the service user's identity
    router/        the per-node HTTP router, its own process (``python -m agent.router``); the
                   agent drives it through ``router.control``
    errors.py      the agent's error tree (the router draws its own in ``router/errors.py``)
    edge.py, cadence.py, presence.py, simulate.py, lean.py: small shared pieces

What may import what: ``reconcile`` imports only ``protocol`` (no asyncio, no clock). ``host``
imports ``protocol``, ``errors``, ``cadence`` and itself. ``router`` imports ``protocol``,
``errors``, ``edge`` and ``host.identity`` (to start as the service user), never the manager.
``manager`` imports the reconciler, ``host``, ``router.control`` and ``protocol``; ``main`` and
``daemon`` put it all together. Only ``protocol.bus`` imports ``nats``.
"""

__version__ = "0.1.0"
