"""Drives an edge node with the official OpenAI Python SDK, as a new user would.

Usage: python openai_client.py BASE_URL API_KEY MODEL
Prints one JSON line with what the SDK got back; exits non-zero on any SDK error.
"""
import json
import sys

from openai import OpenAI

base_url, api_key, model = sys.argv[1:4]
client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=20)

completion = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "hello from the sdk"}],
)

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "stream to the sdk"}],
    stream=True,
    stream_options={"include_usage": True},
)
pieces, usage = [], None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage.completion_tokens

models = [m.id for m in client.models.list()]

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    error = None
except Exception as e:  # the SDK's typed error for a 404
    error = type(e).__name__

print(json.dumps({
    "text": completion.choices[0].message.content,
    "usage": completion.usage.total_tokens,
    "stream_text": "".join(pieces),
    "stream_chunks": len(pieces),
    "stream_usage": usage,
    "models": models,
    "unknown_model_error": error,
}))
