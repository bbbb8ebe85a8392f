"""Names for values that are arbitrary JSON: decoded from a client's body, a file or an AWS answer.

Typed as Any because their shape is the sender's; code that reads one checks what it needs."""
from typing import Any, TypeAlias

JSONValue: TypeAlias = Any
JSONObject: TypeAlias = dict[str, JSONValue]
