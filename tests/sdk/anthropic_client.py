"""Drives an edge node with the official Anthropic Python SDK, as a new user would.

Usage: python anthropic_client.py BASE_URL API_KEY MODEL
Prints one JSON line with what the SDK got back; exits non-zero on any SDK error.
"""
import json
import sys

from anthropic import Anthropic, NotFoundError

base_url, api_key, model = sys.argv[1:4]
client = Anthropic(base_url=base_url, api_key=api_key, max_retries=0, timeout=20)

message = client.messages.create(
    model=model,
    max_tokens=100,
    messages=[{"role": "user", "content": "hello from the sdk"}],
)

with client.messages.stream(
    model=model,
    max_tokens=100,
    messages=[{"role": "user", "content": "stream to the sdk"}],
) as stream:
    pieces = list(stream.text_stream)
    final = stream.get_final_message()

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
asked = [{"role": "user", "content": "Paris"}]
tool_call = client.messages.create(model=model, max_tokens=100, tools=[WEATHER], messages=asked)
tool_use = next(b for b in tool_call.content if b.type == "tool_use")
answered = client.messages.create(
    model=model,
    max_tokens=100,
    tools=[WEATHER],
    messages=asked + [
        {"role": "assistant", "content": tool_call.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny"}]},
    ],
)

# The same tool call, streamed: the SDK assembles the input from its JSON deltas.
with client.messages.stream(model=model, max_tokens=100, tools=[WEATHER], messages=asked) as stream:
    streamed_tool = stream.get_final_message()
streamed_use = next(b for b in streamed_tool.content if b.type == "tool_use")

try:
    client.messages.create(model="no-such-model", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    error = None
except NotFoundError as e:  # the SDK's typed error for a 404
    error = type(e).__name__

print(json.dumps({
    "text": message.content[0].text,
    "stop_reason": message.stop_reason,
    "input_tokens": message.usage.input_tokens,
    "output_tokens": message.usage.output_tokens,
    "stream_text": "".join(pieces),
    "stream_pieces": len(pieces),
    "stream_final_text": final.content[0].text,
    "stream_final_stop_reason": final.stop_reason,
    "stream_final_output_tokens": final.usage.output_tokens,
    "tool_stop_reason": tool_call.stop_reason,
    "tool_name": tool_use.name,
    "tool_input": tool_use.input,
    "tool_id": tool_use.id,
    "tool_answer": answered.content[0].text,
    "streamed_tool_name": streamed_use.name,
    "streamed_tool_input": streamed_use.input,
    "streamed_tool_stop_reason": streamed_tool.stop_reason,
    "unknown_model_error": error,
}))
