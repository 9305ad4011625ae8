"""The fleetwave coordinator: planning, the rollout engine, its runner, the API and the CLI."""
