#!/usr/bin/env python3
"""Checks the gateway's tokens-per-minute window through the official OpenAI Python SDK.

Start the gateway with --tpm 150 (its mock upstream reports the usage of each answer), or
two gateways with --tpm 150 on one Redis, then run:

    pip install openai
    python3 .ci/openai_sdk_windows.py BASE_URL [OTHER_REPLICA_URL]

Requests of one tenant alternate between the URLs given. Each is estimated at about 67
tokens (its prompt and max_tokens), and settles on the usage the mock reports (about 18),
so the minute's 150 admit about five before the window holds less than an estimate.
Then the SDK raises its rate-limit error with the window's code and a Retry-After of whole
seconds. With two gateways, the minute is shared: were each counting its own, twice as
many would get through. The script exits non-zero on the first failure.
"""

import sys

import openai

URLS = sys.argv[1:] or ["http://127.0.0.1:3000/v1"]
HELLO = [{"role": "user", "content": "Say hello."}]


def check(condition, what):
    if not condition:
        print(f"FAIL: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def main():
    clients = [
        openai.OpenAI(
            base_url=url,
            api_key="unused",
            default_headers={"x-tenant-id": f"windowed-{len(URLS)}"},
            max_retries=0,
            timeout=30,
        )
        for url in URLS
    ]
    admitted, refusal = 0, None
    for n in range(20):
        try:
            clients[n % len(clients)].chat.completions.create(
                model="gpt-4o-mini", messages=HELLO, max_tokens=64
            )
            admitted += 1
        except openai.RateLimitError as error:
            refusal = error
            break
    check(refusal is not None, f"refused after {admitted} admitted")
    check(3 <= admitted <= 6, f"{admitted} admitted by {len(URLS)} gateway(s) in the minute")
    body = refusal.response.json()
    check(body["error"]["code"] == "window_exceeded", f"code {body['error']['code']}")
    check("tokens per minute" in body["error"]["message"], body["error"]["message"])
    retry_after = int(refusal.response.headers["retry-after"])
    check(1 <= retry_after <= 60, f"Retry-After {retry_after}")
    check(
        refusal.response.headers["x-ratelimit-limit-tokens"] == "150",
        "x-ratelimit-limit-tokens names the window's limit",
    )


if __name__ == "__main__":
    main()
