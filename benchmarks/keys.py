"""What keys cost a request, measured side by side in one run (no Ray: the store and the checks alone).

    .venv/bin/python -m benchmarks.keys [--keys 10000] [--n 2000]

Targets, from what a request may spend (issue 16 set the graph's whole overhead at 10 ms p50 and a refusal at 50 ms):
- the key lookup every keyed request pays on the event loop: at most 0.1 ms p50 (1% of the graph's budget), also with
  10,000 keys in the store;
- counting a render against a limited key (one write transaction, in a worker thread, then its release): at most
  2 ms p50 together, so a rate-limited refusal stays far inside the 50 ms a refusal may take;
- checking a signed image link: at most 0.05 ms p50.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from graph.auth import check_link, resolve_caller, sign_link
from graph.keys import KeyStore


def timed(fn, n: int) -> float:
    """Median microseconds of `fn()` over n calls."""
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e6)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=10_000, help="keys in the store besides the measured ones")
    ap.add_argument("--n", type=int, default=2000, help="calls per measurement")
    args = ap.parse_args(argv)
    store = KeyStore(tempfile.mkdtemp(prefix="prism-keys-bench-"))
    key, _ = store.create("bench", "pro")
    limited_key, limited = store.create("bench", "pro", rpm=10**6, concurrent=10**6)
    few = timed(lambda: resolve_caller("required", f"Bearer {key}", store.lookup), args.n)
    for i in range(args.keys):
        store.create(f"t{i % 500}", "free")
    many = timed(lambda: resolve_caller("required", f"Bearer {key}", store.lookup), args.n)
    counter = iter(range(10**9))

    def count_and_release() -> None:
        rid = f"r{next(counter)}"
        store.start(limited, rid, hold_s=60)
        store.finish(limited.key_id, rid)

    limits = timed(count_and_release, args.n)
    secret = store.url_secret()
    query = dict(p.split("=", 1) for p in sign_link(secret, "rid", 0, 3600).split("&"))
    link = timed(lambda: check_link(secret, "rid", 0, int(query["expires"]), query["sig"]), args.n)
    anonymous = timed(lambda: resolve_caller("optional", None, store.lookup), args.n)
    print(f"median per call ({args.n} calls each):")
    print(f"  anonymous caller (optional mode, no key):        {anonymous:8.1f} us")
    print(f"  key lookup, 2 keys in the store:                 {few:8.1f} us   (target <= 100 us)")
    print(f"  key lookup, {args.keys + 2} keys in the store:            {many:8.1f} us   ({many / few:.2f}x the 2-key "
          "figure)")
    print(f"  limited key: count + release (2 transactions):   {limits:8.1f} us   (target <= 2000 us)")
    print(f"  signed image link check:                         {link:8.1f} us   (target <= 50 us)")
    store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
