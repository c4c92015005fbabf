"""Serving helpers: slot mapping and a serving workload that drives a table like a scheduler."""
