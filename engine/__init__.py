"""ACE-Step generation engine: a validated GenerationRequest in, encoded audio + metadata out.

Importing this package is cheap: torch/diffusers load only when `engine.generator` (or
`engine.loader`) is imported, which only the worker does.
"""
