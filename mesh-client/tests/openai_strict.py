"""The gateway's strictness, as the official `openai` Python SDK sees it.

Usage: python openai_strict.py BASE_URL   (prints one JSON object: what each check saw)
"""
import json
import sys

import openai
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
model = client.models.list().data[0].id
hello = [{"role": "user", "content": "Say hello to the mesh."}]
seen = {}


def refusal(**kwargs):
    """Status, type, code and param of the error a request raises (None if it succeeds)."""
    args = {"model": model, "messages": hello, "max_tokens": 2}
    args.update(kwargs)
    try:
        client.chat.completions.create(**args)
        return None
    except openai.APIStatusError as e:
        return {"status": e.status_code, "type": e.type, "code": e.code, "param": e.param,
                "message": e.message}


seen["unknown_model"] = refusal(model="no-such-model")
seen["temperature_negative"] = refusal(temperature=-1)
seen["temperature_huge"] = refusal(temperature=1e39)
seen["top_p_negative"] = refusal(top_p=-3)
seen["top_p_zero"] = refusal(top_p=0)
seen["unknown_role"] = refusal(messages=[{"role": "wizard", "content": "hi"}])
seen["empty_messages"] = refusal(messages=[])
seen["valid"] = refusal(temperature=2, top_p=1)

# finish_reason: the same when streamed as not.
last = None
for chunk in client.chat.completions.create(
    model=model, messages=hello, max_tokens=8, temperature=0, stream=True
):
    if chunk.choices and chunk.choices[0].finish_reason:
        last = chunk.choices[0].finish_reason
seen["stream_finish"] = last
seen["whole_finish"] = client.chat.completions.create(
    model=model, messages=hello, max_tokens=8, temperature=0
).choices[0].finish_reason


def sample(**kwargs):
    return client.completions.create(
        model=model, prompt="Once", max_tokens=16, temperature=1, **kwargs
    ).choices[0].text


# Without a seed every request samples afresh; with one it repeats.
seen["unseeded"] = [sample(), sample(), sample()]
seen["seeded"] = [sample(seed=7), sample(seed=7)]

# stream_options.include_usage: a last chunk with no choices and the usage.
chunks = list(client.chat.completions.create(
    model=model, messages=hello, max_tokens=8, temperature=0, stream=True,
    stream_options={"include_usage": True},
))
seen["usage_chunk"] = {
    "choices": len(chunks[-1].choices),
    "usage": chunks[-1].usage.model_dump() if chunks[-1].usage else None,
    "usage_before_last": any(c.usage for c in chunks[:-1]),
}
print(json.dumps(seen))
