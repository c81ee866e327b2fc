"""Prefect flows and the `lowrank` command line."""
