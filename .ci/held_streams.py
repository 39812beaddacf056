#!/usr/bin/env python3
"""How many streams one tenant holds at once through the gateway, after its requests have
taught the gateway what they produce.

    cargo run --example gateway -- --cap 4096 --token-delay-ms 100 [--no-adaptive] &
    python3 .ci/held_streams.py [BASE_URL]     (needs httpx2, installed with openai)

Sends 50 requests without max_tokens (three at a time, under the cap), then opens streams
without max_tokens until one is refused, and prints what one stream holds and how many
were held at once.
"""

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx

BASE = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:3000"
HEADERS = {"x-tenant-id": "acme"}
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello."}]}
URL = BASE + "/v1/chat/completions"


def answer(_):
    with httpx.Client(timeout=60) as client:
        return client.post(URL, headers=HEADERS, json=BODY).status_code


def main():
    with ThreadPoolExecutor(3) as pool:
        codes = set(pool.map(answer, range(50)))
    print(f"50 answers: {codes}")
    client = httpx.Client(timeout=60)
    streams = []
    while len(streams) < 2000:
        request = client.build_request("POST", URL, headers=HEADERS, json=dict(BODY, stream=True))
        response = client.send(request, stream=True)
        if response.status_code == 429:
            response.close()
            break
        streams.append(response)
        if len(streams) == 1:
            time.sleep(0.05)
            print("one stream holds:", client.get(BASE + "/admin/tenants/acme").text)
    print("streams held at once:", len(streams))
    for response in streams:
        response.close()


if __name__ == "__main__":
    main()
