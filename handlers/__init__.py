"""The HTTP API (ACE-Step REST API, compatible with upstream `acestep-api`).

Nothing in this package imports torch/diffusers/transformers: the Lambda cold start stays light.
Build the app with `handlers.app.create_app(settings, backend)`.
"""
