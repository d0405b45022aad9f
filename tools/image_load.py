#!/usr/bin/env python3
"""Closed-loop SearchByImage load on a running vitrine server, with grpcio and no generated
stubs (it runs where grpcio is installed but protoc is not, such as the GPU machines).

`--concurrency` callers each send SearchByImage with a random image of those given, wait for the
answer and send the next, for `--seconds`; prints one JSON object: answers per second and the
latency percentiles of the OK answers, and the other status codes by name. Used by
tools/gpu_check.sh to compare the server with and without query micro-batching.

  python3 tools/image_load.py --addr 127.0.0.1:50051 --concurrency 64 --seconds 5 data/images/*.jpg
"""

import argparse
import json
import random
import threading
import time

import grpc

METHOD = "/vitrine.v1.VisualSearch/SearchByImage"


def search_by_image_request(image: bytes) -> bytes:
    """SearchByImageRequest { bytes image = 1; } in protobuf's wire format (options left out:
    the server's defaults)."""
    n, length = len(image), bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        length.append(byte | (0x80 if n else 0))
        if not n:
            break
    return b"\x0a" + bytes(length) + image


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--addr", default="127.0.0.1:50051")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of load not counted")
    ap.add_argument("images", nargs="+")
    args = ap.parse_args()

    requests = [search_by_image_request(open(p, "rb").read()) for p in args.images]
    channel = grpc.insecure_channel(args.addr, options=[("grpc.max_send_message_length", 64 << 20)])
    grpc.channel_ready_future(channel).result(timeout=30)
    call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)

    lock = threading.Lock()
    latencies, codes = [], {}
    start = time.monotonic()
    counted_from, stop_at = start + args.warmup, start + args.warmup + args.seconds

    def caller(seed):
        rng = random.Random(seed)
        while True:
            sent = time.monotonic()
            if sent >= stop_at:
                return
            try:
                call(rng.choice(requests), timeout=60)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            done = time.monotonic()
            if sent >= counted_from and done <= stop_at:
                with lock:
                    codes[code] = codes.get(code, 0) + 1
                    if code == "OK":
                        latencies.append(done - sent)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    ms = lambda v: None if v is None else round(v * 1e3, 2)
    print(json.dumps({
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "ok_per_sec": round(codes.get("OK", 0) / args.seconds, 1),
        "p50_ms": ms(percentile(latencies, 0.50)),
        "p99_ms": ms(percentile(latencies, 0.99)),
        "max_ms": ms(latencies[-1] if latencies else None),
        "codes": codes,
    }))


if __name__ == "__main__":
    main()
