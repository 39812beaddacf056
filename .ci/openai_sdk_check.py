#!/usr/bin/env python3
"""Checks that the official OpenAI Python SDK works unchanged against examples/gateway/main.rs.

Start the gateway (any --cap of 100 or more; --chunks and --token-delay-ms such that an
answer takes 0.2 s or more, as the defaults' 0.4 s do), then run:

    pip install openai
    python3 .ci/openai_sdk_check.py [BASE_URL [OTHER_REPLICA_URL]]

BASE_URL defaults to $GATEWAY_BASE_URL, else http://127.0.0.1:3000/v1. OTHER_REPLICA_URL is
a second gateway sharing the caps through Redis: the requests over the cap in 4 and 5 go
there, so the refusal must come from the cap the two share. The script prints each check
and exits non-zero on the first failure. It checks:

1. a non-streaming chat completion (content, model echo, usage);
2. a streaming one with stream_options.include_usage (chunks, finish_reason, usage chunk),
   and one without it that receives no trace of the usage the gateway asked for;
3. a request larger than the cap: the SDK raises APIStatusError 413, x-ratelimit-limit-tokens;
4. a request while a stream holds the whole cap: the SDK raises openai.RateLimitError
   (status 429, Retry-After, code rate_limit_exceeded) with max_retries=0;
5. with retries on, the SDK waits Retry-After and gets through once that stream is closed;
6. /admin/tenants/{tenant} reports nothing in flight for the tenants used.
"""

import json
import os
import sys
import time
import threading
import urllib.request

import openai

BASE_URL = (sys.argv[1] if len(sys.argv) > 1 else None) or os.environ.get(
    "GATEWAY_BASE_URL", "http://127.0.0.1:3000/v1"
)
OTHER_URL = sys.argv[2] if len(sys.argv) > 2 else BASE_URL
MODEL = "gpt-4o-mini"
HELLO = [{"role": "user", "content": "Say hello."}]
ANSWER = 64  # max_tokens for ordinary calls: their estimate is about 67, under any sane cap


def check(condition, what):
    if not condition:
        print(f"FAIL: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def client(tenant, max_retries=0, http_client=None, base_url=BASE_URL):
    return openai.OpenAI(
        base_url=base_url,
        api_key="unused",  # the gateway does not authenticate; a real one would
        default_headers={"x-tenant-id": tenant},
        max_retries=max_retries,
        timeout=30,
        http_client=http_client,
    )


def main():
    print(f"openai {openai.__version__} against {BASE_URL} (over-cap requests: {OTHER_URL})")
    run = os.getpid()
    acme = client("acme")

    # 1. Non-streaming.
    reply = acme.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=ANSWER)
    content = reply.choices[0].message.content
    check(bool(content), f"non-streaming answer: {content!r}")
    check(reply.model == MODEL, f"model echoed: {reply.model}")
    usage = reply.usage
    check(
        usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > 0,
        f"usage: {usage.prompt_tokens} + {usage.completion_tokens} = {usage.total_tokens}",
    )

    # 2. Streaming, with the usage chunk at the end.
    stream = acme.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=ANSWER,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.object != "chat.completion.chunk":
            check(False, f"chunk object is chat.completion.chunk, not {chunk.object}")
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    text = "".join(pieces)
    check(len(pieces) > 1 and bool(text), f"streamed {len(pieces)} chunks: {text!r}")
    check(finish in ("stop", "length"), f"finish_reason: {finish}")
    check(usage is not None and usage.total_tokens > 0, f"usage chunk: {usage}")

    # 2b. Streaming without asking for usage: the gateway asks for it on the way up and
    # takes the answer out again, so the chunks are those of a stream that never asked:
    # no `usage` field in any chunk (not even null), one chunk fewer than the stream above
    # (no usage chunk), and otherwise the same chunks.
    def chunks(**options):
        return list(
            acme.chat.completions.create(
                model=MODEL, messages=HELLO, max_tokens=ANSWER, stream=True, **options
            )
        )

    def content(chunk):
        return chunk.model_dump(exclude={"id", "created", "usage"})

    unasked = chunks()
    asked = chunks(stream_options={"include_usage": True})
    check(
        all("usage" not in chunk.model_fields_set for chunk in unasked),
        f"no usage field in any of {len(unasked)} chunks of a stream that did not ask",
    )
    check(
        len(unasked) == len(asked) - 1 and asked[-1].usage is not None,
        f"{len(unasked)} chunks unasked, {len(asked)} with the usage chunk asked for",
    )
    check(
        [content(chunk) for chunk in unasked] == [content(chunk) for chunk in asked[:-1]],
        "the same chunks otherwise (ids and timestamps aside)",
    )

    # 3. Larger than the cap: 413, never retried. Learn the cap from its header.
    tenant = f"sdk-check-{run}"
    limited = client(tenant)
    try:
        limited.chat.completions.create(model=MODEL, messages=[], max_tokens=10**15)
        check(False, "a request larger than the cap is refused")
    except openai.RateLimitError as error:
        check(False, f"413 expected, got RateLimitError {error}")
    except openai.APIStatusError as error:
        check(error.status_code == 413, f"too large: APIStatusError {error.status_code}")
        cap = int(error.response.headers["x-ratelimit-limit-tokens"])
        check(cap > 0, f"x-ratelimit-limit-tokens: {cap}")

    # 4. A stream holding the whole cap (no prompt text, max_tokens = cap), then one more.
    holder = limited.chat.completions.create(
        model=MODEL, messages=[], max_tokens=cap, stream=True
    )
    first = next(iter(holder))  # admitted and streaming: the cap is held until it ends
    check(first.object == "chat.completion.chunk", "holding stream admitted")
    try:
        client(tenant, base_url=OTHER_URL).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=ANSWER)
        check(False, "a request over the cap raises openai.RateLimitError")
    except openai.RateLimitError as error:
        headers = error.response.headers
        check(error.status_code == 429, "over the cap: openai.RateLimitError (429)")
        check(error.code == "rate_limit_exceeded", f"error code: {error.code}")
        retry_after = headers.get("retry-after", "")
        check(retry_after.isdigit(), f"Retry-After: {retry_after}")
        check(
            headers.get("x-ratelimit-remaining-tokens") == "0",
            "x-ratelimit-limit-tokens: {}, x-ratelimit-remaining-tokens: {}".format(
                headers.get("x-ratelimit-limit-tokens"),
                headers.get("x-ratelimit-remaining-tokens"),
            ),
        )

    # 5. The SDK's retry honours Retry-After: a retrying request starts while the stream
    #    still holds the cap, gets 429, and gets through once the client has hung up on the
    #    stream (or it has ended) and the gateway has released its reservation.
    statuses = []
    recorder = openai.DefaultHttpxClient(
        event_hooks={"response": [lambda response: statuses.append(response.status_code)]}
    )
    retrying = client(tenant, max_retries=3, http_client=recorder, base_url=OTHER_URL)
    result = {}

    def call():
        result["reply"] = retrying.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=ANSWER
        )

    thread = threading.Thread(target=call)
    started = time.monotonic()
    thread.start()
    while not statuses and time.monotonic() - started < 10:
        time.sleep(0.005)
    check(statuses[:1] == [429], f"retrying client's first attempt refused: {statuses}")
    holder.close()
    thread.join(60)
    elapsed = time.monotonic() - started
    check("reply" in result, f"retrying client got through in {elapsed:.1f} s: {statuses}")
    check(statuses[-1] == 200 and elapsed >= 1, "it waited for Retry-After before retrying")

    # 6. Nothing left in flight.
    admin = BASE_URL.rstrip("/").removesuffix("/v1") + "/admin/tenants/"
    deadline = time.monotonic() + 5
    while True:
        in_flight = {}
        for name in ("acme", tenant):
            with urllib.request.urlopen(admin + name, timeout=10) as response:
                in_flight[name] = json.load(response)["in_flight"]
        if all(v == 0 for v in in_flight.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    check(all(v == 0 for v in in_flight.values()), f"/admin/tenants/... in_flight is 0: {in_flight}")
    print("all OpenAI SDK checks passed")


if __name__ == "__main__":
    try:
        main()
    except openai.APIError as error:
        print(f"FAIL: unexpected {type(error).__name__}: {error}")
        sys.exit(1)
