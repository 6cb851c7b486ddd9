"""The `openai` package against a running `eesd-infer serve` (base URL in argv[1]).

Greedy completions and chat, whole and streamed (the stream's text must equal the whole
response's, usage in the last chunk), and an invalid request raised as the client's
BadRequestError. Prints one JSON line with the texts for the Rust test to compare.
"""
import json
import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
model = client.models.list().data[0].id

out = {"model": model}
c = client.completions.create(model=model, prompt="w3 w9 w4", max_tokens=20, temperature=0)
out["completion"] = c.choices[0].text
assert c.usage.completion_tokens >= 1, c
streamed = "".join(
    ch.choices[0].text
    for ch in client.completions.create(
        model=model, prompt="w3 w9 w4", max_tokens=20, temperature=0, stream=True
    )
    if ch.choices
)
assert streamed == out["completion"], (streamed, out["completion"])

messages = [{"role": "user", "content": "w5 w6 w7"}]
r = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
out["chat"] = r.choices[0].message.content
assert r.choices[0].message.role == "assistant"
pieces, usage = [], None
for ch in client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=16,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
):
    if ch.choices and ch.choices[0].delta.content:
        pieces.append(ch.choices[0].delta.content)
    if ch.usage is not None:
        usage = ch.usage
assert "".join(pieces) == out["chat"], (pieces, out["chat"])
assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

try:
    client.completions.create(model=model, prompt="w1", max_tokens=0)
    raise SystemExit("max_tokens 0 was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "max_tokens", e.body
    out["error"] = e.body["message"]

print(json.dumps(out))
