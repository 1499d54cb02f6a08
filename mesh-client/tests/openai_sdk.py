"""Drive mesh's OpenAI-compatible gateway with the official `openai` Python SDK.

Usage: python openai_sdk.py BASE_URL   (prints one JSON line with what the SDK saw)
"""
import json
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="unused")
models = [m.id for m in client.models.list().data]
messages = [{"role": "user", "content": "Say hello to the mesh."}]
streamed = ""
chunks = 0
for chunk in client.chat.completions.create(
    model=models[0], messages=messages, stream=True, max_tokens=16, temperature=0, seed=0
):
    chunks += 1
    if chunk.choices and chunk.choices[0].delta.content:
        streamed += chunk.choices[0].delta.content
whole = client.chat.completions.create(
    model=models[0], messages=messages, max_tokens=16, temperature=0, seed=0
)
completion = client.completions.create(model=models[0], prompt="Hello", max_tokens=8, temperature=0)
print(json.dumps({
    "models": models,
    "streamed": streamed,
    "chunks": chunks,
    "whole": whole.choices[0].message.content,
    "finish": whole.choices[0].finish_reason,
    "completion_tokens": whole.usage.completion_tokens,
    "text_completion": completion.choices[0].text,
}))
