"""Asks an edge node for embeddings with the official OpenAI Python SDK, as a new user would:
`client.embeddings.create(model=..., input=...)` with the SDK's defaults (which ask for
`encoding_format: "base64"` and decode it), and again with `encoding_format="float"`.

Usage: python openai_embeddings.py BASE_URL API_KEY MODEL TEXT...
Prints one JSON line with both answers' vectors; exits non-zero on any SDK error.
"""
import json
import sys

from openai import OpenAI

base_url, api_key, model = sys.argv[1:4]
texts = sys.argv[4:]
client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)

default = client.embeddings.create(model=model, input=texts)
floats = client.embeddings.create(model=model, input=texts, encoding_format="float")

print(json.dumps({
    "default": [d.embedding for d in default.data],
    "default_tokens": default.usage.prompt_tokens,
    "float": [d.embedding for d in floats.data],
    "model": default.model,
}))
