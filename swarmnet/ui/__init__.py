"""Watching and bootstrapping a swarm: the status view, its collector, plots and CLI commands."""
