"""Cost per render: a pure function of the tier's price sheet and the compute it used."""

from __future__ import annotations


def render_cost(usd_per_image: float, usd_per_second: float, n_images: int, compute_s: float) -> float:
    """Price = per-image fee x images + replica price per second x seconds of compute.

    Example: a $0.002/s GPU replica that spent 1.5 s on 2 images with no per-image fee costs $0.003.
    """
    return round(usd_per_image * n_images + usd_per_second * max(compute_s, 0.0), 8)
