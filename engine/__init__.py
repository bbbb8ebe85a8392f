"""ACE-Step generation engine: a validated GenerationRequest in, encoded audio + metadata out.

Importing this package is cheap: torch/diffusers load only when `engine.service` (or
`engine.weights.random_pipeline` / `engine.audio_io`) is imported, which only the worker does.
See engine/README.md for the public API and its rules.
"""
