"""Logs, metrics and health: what an operator reads to know the service is well."""
