"""The official `openai` Python package against a moe server (run by serve_api.rs).

usage: openai_client.py BASE_URL GOLDEN_JSON [CONCURRENT]
With CONCURRENT, also sends that many greedy completions of the golden prompts at once (from as
many threads) and checks each against its golden continuation. Exits non-zero (with a traceback)
on any mismatch.
"""
import json
import sys
from concurrent.futures import ThreadPoolExecutor

import openai

base, golden_path = sys.argv[1], sys.argv[2]
golden = json.load(open(golden_path))
client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
model = client.models.list().data[0].id
ext = {"ignore_eos": True, "return_tokens_as_token_ids": True}


def ids(tokens):
    return [int(t.split(":", 1)[1]) for t in tokens]


# Completions from token ids: the golden greedy continuation, with logprobs.
r = client.completions.create(model=model, prompt=golden["prompts"][1]["ids"], max_tokens=24,
                              temperature=0, logprobs=2, extra_body=ext)
assert ids(r.choices[0].logprobs.tokens) == golden["results"][1]["generated_ids"], r
assert len(r.choices[0].logprobs.top_logprobs[0]) == 2
assert r.usage.completion_tokens == 24 and r.choices[0].finish_reason == "length"

# Chat completions render the model's template: golden prompt_2.
c = client.chat.completions.create(model=model, messages=golden["prompts"][2]["messages"], max_tokens=24,
                                   temperature=0, logprobs=True, top_logprobs=2, extra_body=ext)
assert c.usage.prompt_tokens == 46, c.usage
assert ids([e.token for e in c.choices[0].logprobs.content]) == golden["results"][2]["generated_ids"]
assert c.choices[0].message.role == "assistant"

# Streaming completions give the same text as a plain call.
plain = client.completions.create(model=model, prompt="The cat sat", max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
chunks = list(client.completions.create(model=model, prompt="The cat sat", max_tokens=10, temperature=0,
                                        stream=True, stream_options={"include_usage": True},
                                        extra_body={"ignore_eos": True}))
assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == plain.choices[0].text
assert chunks[-1].usage.completion_tokens == 10

# Streaming chat: role first, then content, then the finish reason.
chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=6, temperature=0, stream=True,
                                             extra_body={"ignore_eos": True}))
assert chunks[0].choices[0].delta.role == "assistant"
assert chunks[-1].choices[0].finish_reason == "length"

# Errors surface as the client's typed exceptions.
try:
    client.completions.create(model=model, prompt="x", temperature=5)
    raise AssertionError("temperature 5 was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "temperature", e.body
try:
    client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("unknown model accepted")
except openai.BadRequestError as e:
    assert "does not exist" in e.body["message"], e.body



def check_golden(i, got):
    """The golden rule: ids match step by step; a mismatch at step t is acceptable only where the
    reference margin there is at most the threshold, and ends the comparison."""
    res = golden["results"][i]
    threshold = golden["tolerances"]["greedy_margin_threshold"]
    for t, (a, b) in enumerate(zip(got, res["generated_ids"])):
        if a != b:
            assert res["greedy_margins"][t] <= threshold, (i, t, got, res["generated_ids"])
            return
    assert len(got) == len(res["generated_ids"]), (i, got)


concurrent = int(sys.argv[3]) if len(sys.argv) > 3 else 0
if concurrent:
    def one(k):
        i = k % len(golden["prompts"])
        r = client.completions.create(model=model, prompt=golden["prompts"][i]["ids"], max_tokens=24,
                                      temperature=0, logprobs=0, extra_body=ext)
        check_golden(i, ids(r.choices[0].logprobs.tokens))
        return r.usage.completion_tokens

    with ThreadPoolExecutor(max_workers=concurrent) as pool:
        done = list(pool.map(one, range(concurrent)))
    assert done == [24] * concurrent, done
    print(concurrent, "concurrent golden completions ok")

print("openai", openai.__version__, "ok")
