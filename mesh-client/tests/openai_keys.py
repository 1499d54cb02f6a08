"""A shared gateway's keys, rate limit, usage and cost, as the official `openai` Python SDK
sees them.

Usage: python openai_keys.py BASE_URL KEY BURST_KEY
(prints one JSON object: what each check saw)
"""
import json
import sys

import openai
from openai import OpenAI

base, key, burst_key = sys.argv[1], sys.argv[2], sys.argv[3]
hello = [{"role": "user", "content": "Say hello to the mesh."}]
seen = {"costs": []}


def refusal(api_key, **kwargs):
    """Status, type and code of the error a request with `api_key` raises (None if none)."""
    c = OpenAI(base_url=base, api_key=api_key, max_retries=0)
    try:
        c.models.list(**kwargs)
        return None
    except openai.APIStatusError as e:
        return {"status": e.status_code, "type": e.type, "code": e.code, "message": e.message,
                "class": type(e).__name__}


# The SDK insists on some key; Omit() takes its header off the request.
seen["no_key"] = refusal("unused", extra_headers={"Authorization": openai.Omit()})
seen["bad_key"] = refusal("sk-mesh-not-a-key-of-this-gateway")

client = OpenAI(base_url=base, api_key=key, max_retries=0)
model = client.models.list().data[0].id

# Streamed without include_usage: the final chunk (the finish) carries usage and cost.
chunks = list(client.chat.completions.create(
    model=model, messages=hello, max_tokens=8, temperature=0, stream=True))
seen["stream_final_usage"] = chunks[-1].usage.model_dump() if chunks[-1].usage else None
seen["stream_usage_before_final"] = any(c.usage for c in chunks[:-1])
seen["costs"].append(seen["stream_final_usage"]["cost"])

# Streamed with include_usage: the usage chunk is the final one and carries the cost.
chunks = list(client.chat.completions.create(
    model=model, messages=hello, max_tokens=8, temperature=0, stream=True,
    stream_options={"include_usage": True}))
seen["include_usage_final"] = chunks[-1].usage.model_dump()
seen["costs"].append(seen["include_usage_final"]["cost"])

# Whole answers: usage.cost; X-Request-Id echoed when sent, made when not.
raw = client.chat.completions.with_raw_response.create(
    model=model, messages=hello, max_tokens=8, temperature=0,
    extra_headers={"X-Request-Id": "sdk-request-7"})
whole = raw.parse()
seen["echoed_request_id"] = raw.headers.get("x-request-id")
seen["whole_usage"] = whole.usage.model_dump()
seen["costs"].append(whole.usage.model_dump()["cost"])
text = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0)
seen["made_request_id"] = text._request_id
seen["costs"].append(text.usage.model_dump()["cost"])

# The key's usage: these four answers.
seen["usage"] = client.get("/usage", cast_to=object)

# A burst on another key: the first requests pass, then 429 with Retry-After.
burst = OpenAI(base_url=base, api_key=burst_key, max_retries=0)
seen["burst"] = []
for _ in range(6):
    try:
        r = burst.completions.create(model=model, prompt="Hi", max_tokens=1, temperature=0)
        seen["burst"].append({"status": 200, "cost": r.usage.model_dump()["cost"]})
        seen["costs"].append(r.usage.model_dump()["cost"])
    except openai.RateLimitError as e:
        seen["burst"].append({"status": e.status_code, "code": e.code, "type": e.type,
                              "retry_after": e.response.headers.get("retry-after")})
seen["burst_usage"] = burst.get("/usage", cast_to=object)
print(json.dumps(seen))
