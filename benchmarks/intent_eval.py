"""Intent classifier: accuracy on the held-out split and on the external set, and latency per prompt.

    .venv/bin/python benchmarks/intent_eval.py
"""

import statistics
import time

from engines.intent import DATA_DIR, IntentModel, accuracy, load_jsonl, split


def main() -> None:
    model = IntentModel()
    _, held = split(load_jsonl(DATA_DIR / "train.jsonl"))
    ext = load_jsonl(DATA_DIR / "external_eval.jsonl")
    for name, rows in (("held-out split", held), ("external set", ext)):
        acc, per = accuracy(model, rows)
        print(f"{name:15s} n={len(rows):4d} accuracy={acc:.3f}  " + " ".join(f"{k}={v:.2f}" for k, v in per.items()))
    prompts = [r["prompt"] for r in ext]
    model.classify(prompts[:8])  # warm-up
    one = []
    for p in prompts[:100]:
        t = time.perf_counter()
        model.classify([p])
        one.append((time.perf_counter() - t) * 1000)
    batch = []
    for i in range(0, 160, 16):
        t = time.perf_counter()
        model.classify(prompts[i:i + 16])
        batch.append((time.perf_counter() - t) * 1000 / 16)
    b1, b16 = statistics.median(one), statistics.median(batch)
    print(f"latency per prompt: batch 1 median {b1:.1f} ms; batch 16 median {b16:.1f} ms; ratio {b1 / b16:.1f}x")


if __name__ == "__main__":
    main()
