"""Tools for a fleet on one machine: nothing here runs in production.

- ``broker``   the embedded nats-server (``fleetwave broker``, dev fleets, integration tests).
- ``devfleet`` broker + coordinator + N agents as child processes (``fleetwave dev up``).
- ``demo``     ``fleetwave demo``: a scripted tour on a throwaway dev fleet.
- ``traffic``  a checked HTTP load generator (the demo and end-to-end tests).

May import ``protocol`` and the rest of ``coordinator``; nothing under ``coordinator`` outside
``dev`` and ``cli`` imports it. The agent is reached through one entry point only:
``python -m agent.main`` (``AGENT_MODULE``) started as a child process, whose click command
``agent.main.agent_command`` is read to learn which flags this tree's agent takes. Nothing else of
``agent`` is imported.
"""
