#!/usr/bin/env python3
"""End-to-end checks of the gateway example in front of a real model server, through the
official OpenAI Python SDK.

    real_upstream.py --gateway http://127.0.0.1:3100 --cap 600

Prints one `ok: ...` line per check passed and stops at the first `FAIL: ...` (exit 1).
The gateway must run with `--cap` equal to `--cap` here and `--upstream` pointing at a
llama-cpp-python server (`--chat_format gemma`) serving gemma-3-270m; the server must be
otherwise idle, since it answers one request at a time.

    real_upstream.py --direct http://127.0.0.1:8000

runs the same client traffic against the model server itself, without the gateway, and
checks only what the server answers (no caps, no admin pages): a dry run of the traffic.

What the model server does that these checks rely on: a request without `max_tokens`
generates until EOS or the context is full, so every such request here bounds its answer
with a `grammar` (GBNF; an invalid one crashes that server, so only the fixed ones below);
`logit_bias` takes Gemma 3 token ids; streams report no usage (`include_usage` is
ignored), so the gateway counts their text at 4 bytes a token; a streamed request gets its
response head at once even while queued, a non-streamed one only when done (the gateway's
`--upstream-timeout` applies to those, so they are all kept short); a streamed generation
stops when its client goes, a non-streamed one does not; one request runs at a time.
"""
import argparse
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request

import openai

# Gemma 3 token ids: <eos>, <end_of_turn>, and a run of 31 spaces.
EOS_IDS = ("1", "106")
SPACES31_ID = "167"

# A short answer whatever the model would say: a few tokens, then the end of the turn.
SHORT_GRAMMAR = 'root ::= "Fine, thanks."'
# A long answer as the gateway counts streams (text bytes / 4): 65 runs of 31 spaces,
# 2,015 bytes, counted as 504 tokens, produced in 65 tokens (~3 s on 2 cores). The bias
# makes the model pick the 31-space token; the grammar ends the answer there.
LONG_GRAMMAR = "root ::= s{65}\ns ::= [ ]{31}"
LONG_BYTES = 65 * 31

RUN = f"ci{os.getpid()}"


class Failed(Exception):
    pass


def ok(message):
    print(f"ok: {message}", flush=True)


def check(condition, message):
    if not condition:
        raise Failed(message)


# ---------------------------------------------------------------- prompt generators

WORDS = """river mountain engine ledger harbor window garden network budget teacher village
market signal theory bridge kitchen forest library customer invoice planet battery contract
journey morning shadow mirror pattern festival factory harvest island compiler protocol
umbrella orchestra telescope saddle blanket lantern glacier volcano canyon meadow cathedral
pharmacy warehouse algorithm spreadsheet microscope violin passport satellite committee
neighbor merchant recipe insurance hospital railway airport detective senator magazine""".split()
VERBS = """builds carries follows measures repairs watches predicts describes ignores collects
delivers explores rewrites balances abandons borrows compares negotiates translates inspects
assembles forgets remembers questions approves rejects polishes scatters gathers""".split()
ADJS = """quiet enormous fragile ancient bright careful distant eager familiar gentle honest
invisible jagged lucky modern narrow obvious peculiar rapid silent tangled unusual vivid
wooden yellow brittle crimson dusty elegant frozen generous hollow immense luminous""".split()
NAMES = "Alice Bertrand Chiara Dmitri Esperanza Farouk Greta Hiroshi Ingrid Jamal Priya Tomasz".split()
IDENTS = """count total items result buffer index value cache user_id tokens limit offset
payload record row col name path size delta weights score queue node""".split()
ZH = """我们 今天 早上 城市 公园 图书馆 学生 老师 朋友 天气 晴朗 下雨 工作 学习 问题 办法 时间
地方 历史 文化 经济 发展 科学 技术 电脑 手机 网络 数据 市场 公司 山 河 树 花 鸟 春天 夏天
秋天 冬天 美丽 安静 热闹 重要 简单 复杂 快乐 认真 觉得 知道 希望 喜欢 需要 开始 结束 发现
讨论 解决 准备 参观 旅行 北京 上海 长江 火车 飞机 医院 银行 音乐 电影 故事 新闻 报告""".split()
ZH_FRAMES = ["{a}{b}{c}。", "{a}觉得{b}很{c}。", "因为{a}，所以{b}{c}。", "虽然{a}{b}，但是{c}。",
             "{a}在{b}里{c}了{n}个小时。", "{a}和{b}一起去{c}。", "{a}的{b}非常{c}！"]


def english(rng, words):
    out = []
    while len(out) < words:
        s = rng.choice([
            f"The {rng.choice(ADJS)} {rng.choice(WORDS)} {rng.choice(VERBS)} the {rng.choice(WORDS)}.",
            f"{rng.choice(NAMES)} {rng.choice(VERBS)} a {rng.choice(ADJS)} {rng.choice(WORDS)} near the {rng.choice(WORDS)}.",
            f"Why does every {rng.choice(WORDS)} seem so {rng.choice(ADJS)} today?",
            f"Nobody {rng.choice(VERBS)} {rng.randint(2, 99)} {rng.choice(WORDS)}s without a {rng.choice(ADJS)} plan.",
        ])
        out += s.split()
    return " ".join(out[:words]).rstrip(".?") + "."


def code(rng, words):
    lines, budget = [], words
    while budget > 0:
        name = "_".join(rng.sample(IDENTS, 2))
        lines.append(f"def {name}({', '.join(rng.sample(IDENTS, rng.randint(1, 3)))}):")
        depth, budget = 1, budget - 3
        for _ in range(rng.randint(2, 7)):
            pad = "    " * depth
            k = rng.randrange(4)
            if k == 0 and depth < 3:
                lines.append(f"{pad}for {rng.choice(['i', 'x', 'item'])} in {rng.choice(IDENTS)}:")
                depth += 1
            elif k == 1 and depth < 3:
                lines.append(f"{pad}if {rng.choice(IDENTS)} > {rng.randint(0, 99)}:")
                depth += 1
            elif k == 2:
                lines.append(f"{pad}# {english(rng, rng.randint(3, 7)).lower()}")
            else:
                lines.append(f"{pad}{rng.choice(IDENTS)} = {rng.choice(IDENTS)}.get('{rng.choice(IDENTS)}', {rng.randint(0, 9)}) * {rng.randint(2, 9)}")
            budget -= 4
        lines.append(f"{'    ' * depth}return {rng.choice(IDENTS)}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def digits(rng, words):
    if rng.random() < 0.5:
        return " ".join("".join(rng.choice("0123456789") for _ in range(rng.randint(6, 24)))
                        for _ in range(max(1, words // 4)))
    cols = rng.randint(3, 5)
    rows = [" | ".join(str(rng.randint(0, 99999)) for _ in range(cols)) for _ in range(max(1, words // (2 * cols)))]
    return "\n".join(rows)


def json_doc(rng, words):
    def value(depth):
        k = rng.randrange(6 if depth < 2 else 4)
        if k == 0:
            return rng.randint(-9999, 99999)
        if k == 1:
            return round(rng.uniform(-100, 100), 2)
        if k == 2:
            return rng.choice([True, False, None])
        if k == 3:
            return english(rng, rng.randint(1, 4)).rstrip(".")
        if k == 4:
            return [value(depth + 1) for _ in range(rng.randint(1, 3))]
        return {rng.choice(IDENTS): value(depth + 1) for _ in range(rng.randint(1, 3))}
    doc = {}
    while len(json.dumps(doc).split()) < words:
        doc[f"{rng.choice(IDENTS)}_{len(doc)}"] = value(0)
    return json.dumps(doc, indent=rng.choice([None, 2]))


def chinese(rng, words):
    out = ""
    while len(out) < words * 1.5:
        out += rng.choice(ZH_FRAMES).format(a=rng.choice(ZH), b=rng.choice(ZH), c=rng.choice(ZH),
                                            n=rng.choice("一二三四五六七八九十"))
    return out


KINDS = {"english": english, "code": code, "digits": digits, "json": json_doc, "chinese": chinese}
# Words (or the equivalent) of each kind's prompts: up to ~230 real tokens, so every
# estimate fits a 600-token cap with room to spare, and a prompt is evaluated well within
# the gateway's --upstream-timeout even on a busy 2-core machine (~40 tokens/s at worst
# seen, ~500 when idle): non-streamed answers only send their response head when done.
SIZES = {"english": (6, 120), "code": (5, 45), "digits": (6, 50), "json": (4, 30), "chinese": (6, 120)}


# ---------------------------------------------------------------- plumbing

class Env:
    def __init__(self, args):
        self.direct = args.direct is not None
        self.root = (args.direct or args.gateway).rstrip("/")
        self.cap = args.cap
        self.model = args.model
        self.timeout = args.timeout

    def client(self, tenant):
        return openai.OpenAI(base_url=f"{self.root}/v1", api_key="unused", max_retries=0,
                             timeout=self.timeout, default_headers={"x-tenant-id": tenant})

    def admin(self, path):
        with urllib.request.urlopen(f"{self.root}/admin/{path}", timeout=10) as response:
            return json.load(response)

    def in_flight(self, tenant):
        return self.admin(f"tenants/{tenant}")["in_flight"]

    def samples(self, tenant, model):
        for entry in self.admin("estimates")["estimates"]:
            if entry["tenant"] == tenant and entry["model"] == model:
                return entry["samples"], entry.get("output_allowance")
        return 0, None

    def wait_released(self, tenant, within):
        """Waits until `tenant` holds nothing; returns how long that took (seconds)."""
        if self.direct:
            return 0.0
        started = time.monotonic()
        while True:
            held = self.in_flight(tenant)
            if held == 0:
                return time.monotonic() - started
            if time.monotonic() - started > within:
                raise Failed(f"tenant {tenant} still holds {held} tokens {within}s later")
            time.sleep(0.02)


def tenant(name):
    return f"{RUN}-{name}"


def read_stream(stream):
    """Reads a stream to its end: (chunks, text, finish_reason)."""
    chunks, text, finish = 0, "", None
    for chunk in stream:
        chunks += 1
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return chunks, text, finish


def reserved_by(env, raw, max_tokens):
    """The prompt part of an admitted request's reservation, from its rate-limit headers."""
    limit = raw.headers.get("x-ratelimit-limit-tokens")
    remaining = raw.headers.get("x-ratelimit-remaining-tokens")
    check(limit is not None and remaining is not None,
          f"an admitted response without x-ratelimit-* headers: {dict(raw.headers)}")
    check(int(limit) == env.cap, f"x-ratelimit-limit-tokens {limit}, expected the cap {env.cap}")
    return env.cap - int(remaining) - max_tokens


# ---------------------------------------------------------------- checks

def check_completion(env):
    c = env.client(tenant("basic"))
    r = c.chat.completions.create(model=env.model, max_tokens=8,
                                  messages=[{"role": "user", "content": "Name three colours."}])
    check(r.choices and isinstance(r.choices[0].message.content, str), f"no answer: {r}")
    check(r.usage and r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 8, f"usage {r.usage}")
    check(r.choices[0].finish_reason in ("stop", "length"), f"finish_reason {r.choices[0].finish_reason}")
    ok(f"completion: {r.usage.prompt_tokens} prompt + {r.usage.completion_tokens} completion tokens, "
       f"finish_reason {r.choices[0].finish_reason}")


def check_stream(env):
    c = env.client(tenant("basic"))
    stream = c.chat.completions.create(model=env.model, max_tokens=8, stream=True,
                                       messages=[{"role": "user", "content": "Count to five."}])
    chunks, text, finish = read_stream(stream)
    check(chunks >= 3, f"only {chunks} chunks")
    check(text, "a stream with no text")
    check(finish in ("stop", "length"), f"a stream ending without finish_reason ({finish})")
    env.wait_released(tenant("basic"), 1.0)
    ok(f"stream: {chunks} chunks, {len(text)} characters, finish_reason {finish}")


def unlimited_request(env, c, label):
    """A request without max_tokens: must be admitted (200), never 413."""
    try:
        raw = c.chat.completions.with_raw_response.create(
            model=env.model, messages=[{"role": "user", "content": "How are you?"}],
            extra_body={"grammar": SHORT_GRAMMAR})
    except openai.APIStatusError as error:
        raise Failed(f"a request without max_tokens {label}: {error.status_code} {error.body}")
    r = raw.parse()
    check(r.choices[0].message.content, f"no answer {label}")
    if env.direct:
        return None
    reserved = env.cap - int(raw.headers["x-ratelimit-remaining-tokens"])
    check(0 < reserved <= env.cap, f"a request without max_tokens reserved {reserved} {label}")
    return reserved


def check_unlimited(env):
    who = tenant("unlimited")
    c = env.client(who)
    before = unlimited_request(env, c, "before long answers")
    ok(f"a request without max_tokens is admitted on a {env.cap} cap"
       + ("" if env.direct else f" (reserved {before})"))
    started = time.monotonic()
    lag = 0.0
    for i in range(10):
        # Each may reserve the whole cap: the next starts once this one is released (a sync
        # SDK client hangs up right after `data: [DONE]`; the release follows within a second).
        lag = max(lag, env.wait_released(who, 1.0))
        stream = c.chat.completions.create(
            model=env.model, stream=True, logit_bias={SPACES31_ID: 100},
            messages=[{"role": "user", "content": f"Answer {i}: write at length."}],
            extra_body={"grammar": LONG_GRAMMAR})
        chunks, text, finish = read_stream(stream)
        check(finish == "stop" and len(text.encode()) == LONG_BYTES,
              f"long answer {i}: {len(text.encode())} bytes, finish_reason {finish}")
    lag = max(lag, env.wait_released(who, 1.0))
    ok(f"ten long answers without max_tokens ({LONG_BYTES} bytes = {-(-LONG_BYTES // 4)} tokens at "
       f"4 bytes a token, each) in {time.monotonic() - started:.1f}s"
       + ("" if env.direct else f"; each released within {lag:.2f}s of its end"))
    after = unlimited_request(env, c, "after ten long answers")
    if env.direct:
        ok("a request without max_tokens is answered after the long answers")
        return
    samples, allowance = env.samples(who, env.model)
    ok(f"a request without max_tokens is still admitted after ten long answers (reserved {after}; "
       f"learned allowance {allowance} from {samples} samples)")
    if allowance is None or allowance < env.cap:
        print(f"note: the learned allowance ({allowance}) stayed below the cap {env.cap}: "
              "the cut of a guessed allowance to the cap was not exercised", flush=True)
    env.wait_released(who, 1.0)


def check_sdk_streams_teach(env):
    who = tenant("teach")
    c = env.client(who)
    before = 0 if env.direct else env.samples(who, env.model)[0]
    lag = 0.0
    for i in range(10):
        lag = max(lag, env.wait_released(who, 1.0))  # as for the long answers above
        # The sync SDK stops reading at `data: [DONE]` and closes the connection.
        stream = c.chat.completions.create(
            model=env.model, stream=True,
            messages=[{"role": "user", "content": f"Question {i}: how are you?"}],
            extra_body={"grammar": SHORT_GRAMMAR})
        chunks, text, finish = read_stream(stream)
        check(finish == "stop" and text == "Fine, thanks.", f"stream {i}: {text!r}, finish_reason {finish}")
    if env.direct:
        ok("10 SDK streams without max_tokens read to [DONE]")
        return
    deadline = time.monotonic() + 2.0
    while True:
        samples, allowance = env.samples(who, env.model)
        if samples >= before + 10 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    check(samples == before + 10,
          f"10 SDK streams taught {samples - before} output samples (GET /admin/estimates), expected 10")
    lag = max(lag, env.wait_released(who, 1.0))
    ok(f"10 of 10 SDK streams teach the output allowance (samples {before} -> {samples}, "
       f"allowance {allowance}; each released within {lag:.2f}s of its end)")


def check_cap(env):
    busy, other = tenant("busy"), tenant("other")
    c, c2 = env.client(busy), env.client(other)
    # Two streams hold all but ~100 tokens of the cap (250 output tokens each on a 600 cap,
    # plus their short prompts); they cannot end on their own in time (EOS is suppressed,
    # and they are closed below). A third asking for 150 more cannot fit.
    each = (env.cap - 100) // 2
    hold = dict(model=env.model, max_tokens=each, stream=True, logit_bias={i: -100 for i in EOS_IDS})
    a = c.chat.completions.create(messages=[{"role": "user", "content": "Tell a long story about a river."}], **hold)
    b = None
    try:
        next(a)  # the upstream is generating for a
        b = c.chat.completions.create(messages=[{"role": "user", "content": "Tell a long story about a forest."}], **hold)
        if not env.direct:
            held = env.in_flight(busy)
            check(held >= 2 * each, f"two streams of {each} hold only {held}")
            try:
                c.chat.completions.create(model=env.model, max_tokens=150,
                                          messages=[{"role": "user", "content": "And a short one?"}])
                raise Failed(f"a third request over the cap was admitted (in flight {held} of {env.cap})")
            except openai.RateLimitError as error:
                retry_after = error.response.headers.get("retry-after")
                check(retry_after is not None and retry_after.strip().isdigit(),
                      f"429 without a usable Retry-After: {dict(error.response.headers)}")
                ok(f"cap: with {held} of {env.cap} in flight a third request gets RateLimitError "
                   f"(429, Retry-After {retry_after})")
        # Another tenant is served meanwhile: its stream is admitted (response head) while
        # the busy tenant's two are still in flight.
        d = c2.chat.completions.create(model=env.model, max_tokens=8, stream=True,
                                       messages=[{"role": "user", "content": "Say hello."}])
        if not env.direct:
            check(env.in_flight(busy) >= 2 * each, "the busy tenant's streams ended before the other tenant's request")
    finally:
        a.close()
        if b is not None:
            b.close()
    chunks, text, finish = read_stream(d)
    check(chunks >= 2 and finish in ("stop", "length"), f"the other tenant's stream: {chunks} chunks, {finish}")
    env.wait_released(busy, 2.0)
    env.wait_released(other, 1.0)
    ok(f"another tenant is served while the first is at its cap ({chunks} chunks, finish_reason {finish})")


def check_disconnect(env):
    who = tenant("gone")
    c = env.client(who)
    stream = c.chat.completions.create(model=env.model, max_tokens=200, stream=True,
                                       logit_bias={i: -100 for i in EOS_IDS},
                                       messages=[{"role": "user", "content": "Describe the sea at length."}])
    for _ in range(3):
        next(stream)
    if not env.direct:
        held = env.in_flight(who)
        check(held > 0, "a stream in progress holds nothing")
    stream.close()
    started = time.monotonic()
    if env.direct:
        # The server stops generating for a client that is gone: the next answer is prompt.
        env.client(who).chat.completions.create(model=env.model, max_tokens=1,
                                                messages=[{"role": "user", "content": "hi"}])
        check(time.monotonic() - started < 3, "the server kept generating for a closed stream")
        ok(f"a closed stream stops upstream (next answer after {time.monotonic() - started:.2f}s)")
        return
    took = env.wait_released(who, 1.0)
    ok(f"a client disconnecting mid-stream releases its {held} tokens (in flight 0 after {took:.2f}s)")


def answered(label, create):
    """`create()`, once more if the gateway says 504: a non-streamed answer sends its response
    head only when done, and a prompt evaluated on a busy machine can outlast the gateway's
    --upstream-timeout. Only timing, not what is checked, so one retry is allowed."""
    try:
        return create()
    except openai.APIStatusError as error:
        if error.status_code != 504:
            raise
        print(f"note: {label}: 504 from the gateway (the upstream outlasted --upstream-timeout); "
              "retrying once", flush=True)
        time.sleep(1.0)
        return create()


def check_calibration(env, seed):
    model = f"{env.model}-calibration-{RUN}"  # a model name of its own: calibrated from nothing
    rng = random.Random(seed)
    train = env.client(tenant("calibrate"))
    worst = 0.0
    for kind, make in KINDS.items():
        low, high = SIZES[kind]
        for i in range(10):
            messages = [{"role": "user", "content": make(rng, rng.randint(low, high))}]
            r = answered(f"calibration {kind} {i}", lambda: train.chat.completions.create(
                model=model, max_tokens=1, messages=messages))
            check(r.usage.prompt_tokens > 0, f"{kind} {i}: no prompt_tokens")
        text = make(rng, (low + high) // 2)
        fresh = env.client(tenant(f"calibrated-{kind}"))  # nothing else in flight for it
        try:
            raw = answered(f"calibration {kind}", lambda: fresh.chat.completions.with_raw_response.create(
                model=model, max_tokens=1, messages=[{"role": "user", "content": text}]))
        except openai.APIStatusError as error:
            raise Failed(f"calibration {kind}: {error.status_code} {error.body}")
        reported = raw.parse().usage.prompt_tokens
        by_bytes = -(-(len("user") + len(text.encode())) // 4)
        if env.direct:
            ok(f"calibration {kind}: upstream says {reported} prompt tokens (bytes/4: {by_bytes})")
            continue
        estimate = reserved_by(env, raw, 1)
        error = (estimate - reported) / reported
        worst = max(worst, abs(error))
        check(abs(error) <= 0.25,
              f"calibration {kind}: estimate {estimate} vs reported {reported} ({error:+.0%}; bytes/4: {by_bytes})")
        ok(f"calibration {kind}: estimate {estimate} vs reported {reported} ({error:+.0%}; bytes/4 would say {by_bytes})")
    if not env.direct:
        ok(f"prompt calibration within {worst:.0%} for all five kinds")


def timed_stream(url, tenant_id, word):
    """Seconds to the first event and to the end of one short stream sent to `url`."""
    body = {"model": "gemma-3-270m", "max_tokens": 4, "stream": True,
            "messages": [{"role": "user", "content": f"{word}: say it again."}]}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={
        "content-type": "application/json", "x-tenant-id": tenant_id})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        response.readline()
        first = time.perf_counter() - started
        response.read()
    return first, time.perf_counter() - started


def check_overhead(env, upstream, rounds=20):
    """Time to the first and to the last byte of short streams through the gateway against
    straight to the upstream, alternating: reported, not asserted (a shared machine's
    timings are no test), apart from a bound that only buffering would break."""
    if env.direct or not upstream:
        return
    # Each request its own prompt (the server reuses a cached prefix), the two ways taking
    # turns at going first.
    rng = random.Random(11)
    direct, proxied = [], []
    for i in range(rounds):
        ways = [(direct, f"{upstream.rstrip('/')}/v1/chat/completions", "direct"),
                (proxied, f"{env.root}/v1/chat/completions", tenant("overhead"))]
        for samples, url, who in ways[:: 1 if i % 2 else -1]:
            samples.append(timed_stream(url, who, rng.choice(WORDS) + " " + rng.choice(NAMES)))

    def p50(samples, at):
        values = sorted(sample[at] for sample in samples)
        return values[len(values) // 2] * 1000

    first = p50(proxied, 0) - p50(direct, 0)
    last = p50(proxied, 1) - p50(direct, 1)
    check(first < 250, f"the first byte comes {first:.1f} ms later through the gateway")
    ok(f"through the gateway, p50 of {rounds} short streams: first byte {p50(proxied, 0):.1f} ms "
       f"(straight: {p50(direct, 0):.1f} ms, {first:+.1f} ms), last byte {p50(proxied, 1):.1f} ms "
       f"(straight: {p50(direct, 1):.1f} ms, {last:+.1f} ms)")


def check_upstream_down(env, status):
    """With the upstream stopped (`status` 504) or gone (502): an OpenAI-style JSON error for
    a request and a streamed one, and nothing held afterwards."""
    who = tenant(f"down-{status}")
    for stream in (False, True):
        body = {"model": env.model, "max_tokens": 8, "stream": stream,
                "messages": [{"role": "user", "content": "Is anyone there?"}]}
        request = urllib.request.Request(f"{env.root}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json", "x-tenant-id": who})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                got, kind, text = response.status, response.headers.get("content-type", ""), response.read()
        except urllib.error.HTTPError as error:
            got, kind, text = error.code, error.headers.get("content-type", ""), error.read()
        try:
            error = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            error = None
        what = "a streamed request" if stream else "a request"
        check(got == status and kind.startswith("application/json") and isinstance(error, dict),
              f"{what} got {got} {kind} {text[:300]!r}, expected {status} JSON")
        ok(f"{what} gets {status} ({error.get('code')})")
    env.wait_released(who, 1.0)
    ok(f"nothing held after the {status}s")


def check_nothing_held(env):
    if env.direct:
        return
    time.sleep(0.2)
    ours = [t for t in env.admin("tenants")["tenants"] if str(t.get("tenant", "")).startswith(RUN)]
    held = {t["tenant"]: t["in_flight"] for t in ours if t["in_flight"]}
    check(not held, f"tokens still held at the end: {held}")
    ok(f"nothing held at the end ({len(ours)} tenants of this run, all at 0)")


CHECKS = [
    ("completion", check_completion),
    ("stream", check_stream),
    ("unlimited", check_unlimited),
    ("teach", check_sdk_streams_teach),
    ("cap", check_cap),
    ("disconnect", check_disconnect),
    ("calibration", None),
    ("overhead", None),
    ("held", check_nothing_held),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--gateway", help="the gateway's root URL, e.g. http://127.0.0.1:3100")
    where.add_argument("--direct", help="the model server's root URL: the traffic alone, no gateway checks")
    parser.add_argument("--cap", type=int, default=600, help="the gateway's --cap")
    parser.add_argument("--model", default="gemma-3-270m", help="the model name requests send")
    parser.add_argument("--timeout", type=float, default=60.0, help="SDK timeout per request, seconds")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--only", help="comma-separated checks: " + ",".join(n for n, _ in CHECKS))
    parser.add_argument("--upstream", help="the model server's root URL, to compare the gateway's timings with")
    parser.add_argument("--down", type=int, metavar="STATUS",
                        help="only check that requests get STATUS (502, 504) and hold nothing")
    args = parser.parse_args()
    env = Env(args)
    if args.down:
        try:
            check_upstream_down(env, args.down)
        except (Failed, OSError, KeyError, ValueError) as failure:
            print(f"FAIL: {failure}", flush=True)
            return 1
        return 0
    wanted = set(args.only.split(",")) if args.only else {n for n, _ in CHECKS}
    unknown = wanted - {n for n, _ in CHECKS}
    if unknown:
        parser.error(f"unknown checks: {', '.join(sorted(unknown))}")
    started = time.monotonic()
    try:
        for name, run in CHECKS:
            if name not in wanted:
                continue
            t = time.monotonic()
            if name == "calibration":
                check_calibration(env, args.seed)
            elif name == "overhead":
                check_overhead(env, args.upstream)
            else:
                run(env)
            print(f"   ({name}: {time.monotonic() - t:.1f}s)", flush=True)
    except Failed as failure:
        print(f"FAIL: {failure}", flush=True)
        return 1
    except (openai.APIError, urllib.error.URLError, OSError, KeyError, ValueError, StopIteration) as error:
        print(f"FAIL: {type(error).__name__}: {error}", flush=True)
        return 1
    print(f"all checks passed in {time.monotonic() - started:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
