"""schemathesis hooks for scripts/py-test: the push stream's newline-delimited JSON.

docs/openapi.json describes POST /api/progress/stream's body and answer as arrays whose
items are lines; these write a generated array as lines and read an answer's lines back.
"""

import json

import schemathesis


@schemathesis.serializer("application/x-ndjson")
def ndjson_lines(ctx, value):
    """Each item of a generated array as one line (anything else as a single line)."""
    items = value if isinstance(value, list) else [value]
    return "".join(json.dumps(item) + "\n" for item in items).encode()


@schemathesis.deserializer("application/x-ndjson")
def ndjson_answers(ctx, response):
    """The answer's lines as an array, for the response schema check."""
    text = response.content.decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
