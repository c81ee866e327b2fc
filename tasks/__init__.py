"""Prefect tasks: thin adapters from the orchestrator to `lowrank.stages`."""
