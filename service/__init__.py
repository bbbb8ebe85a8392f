"""The service layer shared by the API and the worker: settings, ports, adapters, worker loop.

Nothing here imports torch; the worker imports `engine` lazily.
"""
