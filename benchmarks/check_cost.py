"""Cost of the output checks per image (run on every render of every tier), beside the render itself.

    .venv/bin/python benchmarks/check_cost.py
"""

import statistics
import time

import numpy as np

from engines.checks import check_image


def median_ms(fn, reps: int = 50) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    rng = np.random.default_rng(0)
    for size in (64, 128, 512, 1024):
        img = rng.random((size, size, 3), dtype=np.float32)
        ms = median_ms(lambda img=img, size=size: check_image(img, (size, size)))
        print(f"check_image {size:5d}x{size:<5d} float32: median {ms:7.3f} ms per image")
    from engines.generators import ModelSpec, build_engine

    eng = build_engine(ModelSpec(kind="builtin", name="tiny", config="tiny", native_size=64, steps=4))
    gen_ms = median_ms(lambda: eng.generate(["a red star"], [1], 4, 2.0), reps=10)
    out = eng.generate(["a red star"], [1], 4, 2.0)[0]
    chk_ms = median_ms(lambda: check_image(out, (64, 64)))
    print(f"fast tier render (64 px, 4 steps) median {gen_ms:.1f} ms; its checks {chk_ms:.3f} ms "
          f"({chk_ms / gen_ms:.2%} of the cheapest render)")


if __name__ == "__main__":
    main()
