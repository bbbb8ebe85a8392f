"""acestep-client's version: client/pyproject.toml reads it from here (setuptools `attr`), and the client
sends it in its User-Agent."""
__version__ = "0.1.0"
