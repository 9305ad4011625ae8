"""The service manager: the async shell around the pure reconciler, one object per concern.

    shell.py     ServiceManager: owns the tasks, runs the reconcile loop, carries out actions
    desired.py   DesiredWatch: watches, verifies and accepts this node's desired states
    routing.py   RouterLink: starts, configures and reads each service's router
    observed.py  ObservedWriter: reports each service's observed state
    restore.py   Restorer: the state file, and adoption of slots and routers on start
    events.py    NodeEvents: the node's events, stamped, to the shared protocol.events publisher
    service.py   Service (one service's record), NodeConfig, the timings; no behaviour

The parts share the ``services`` map and a ``wake`` event, and are given what else they use
(the clock, each other) when ``ServiceManager`` builds them, and the bus once it is connected
(``ServiceManager.attach``). They may import the reconciler, ``agent.host``,
``agent.router.control`` (the router's client), ``agent.errors`` and ``protocol``. A part
imports ``service`` and the parts it is handed (``desired`` the events, ``restore`` the router
link); only ``shell`` imports them all.
"""
