"""The release version of acestep-serve, in one place.

pyproject.toml takes the package's version from here (setuptools `attr`), so the installed metadata,
/health, /v1/stats, the OpenAPI document and the Lambda zip (which ships these sources without any
package metadata) all say the same."""
__version__ = "0.1.0"
