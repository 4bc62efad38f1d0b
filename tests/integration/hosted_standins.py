"""The hosted tiers of the integration app's /faults graph: one per hosted kind, each calling its provider's local
stand-in (tests/standins/providers.py) on 127.0.0.1, plus one whose model its provider has shut down. The Ray
replicas run on this machine and reach the stand-ins the test process serves; nothing reaches the internet."""

from contextlib import ExitStack, contextmanager

from tests.standins.providers import google_standin, ideogram_standin, openai_standin, serving

DATED = {"checked": "2026-12-03"}
# tier -> (kind, provider_model, cost); every one falls back to the built-in `ok` tier.
HOSTED = {
    "hosted_gpt": ("openai", "gpt-image-2.6-sunburst",
                   {"usd_per_image": 0.211, "tokens": {"text_input": 5.0, "image_input": 8.0, "image_output": 30.0},
                    "source": "https://developers.openai.com/api/docs/models/gpt-image-2.6-sunburst", **DATED}),
    "hosted_ideogram": ("ideogram", "ideogram-4-5",
                        {"usd_per_image": 0.06, "source": "https://ideogram.ai/blog/ideogram-api-pricing", **DATED}),
    "hosted_gemini": ("google", "gemini-3.1-flash-image",
                      {"usd_per_image": 0.0672, "source": "https://ai.google.dev/gemini-api/docs/pricing", **DATED}),
    # Shut down 2026-10-02: the stand-in answers as Google does for it (404 NOT_FOUND).
    "hosted_retired": ("google", "gemini-2.5-flash-image",
                       {"usd_per_image": 0.039, "source": "https://ai.google.dev/gemini-api/docs/pricing", **DATED}),
}
EXTRA_QUALITY = {"hosted_gpt": {"quality": "high"}, "hosted_ideogram": {"quality": "medium", "magic_prompt": "off"}}


@contextmanager
def hosted_standins(key: str):
    """Serve the three providers' stand-ins for the session: yields {kind: (base_url, Standin)}."""
    apps = {"openai": openai_standin(key), "ideogram": ideogram_standin(key), "google": google_standin(key)}
    with ExitStack() as stack:
        yield {kind: (stack.enter_context(serving(app)), app.state.standin) for kind, app in apps.items()}


def hosted_tiers(standins: dict, key_env: str) -> dict:
    """The hosted tiers' model specs, pointed at the stand-ins."""
    return {tier: {"kind": kind, "name": tier.replace("_", "-"), "provider_model": model,
                   "base_url": standins[kind][0], "api_key_env": key_env, "native_size": 1024, "timeout_s": 20,
                   "max_retries": 1, "retry_backoff_s": 0.05, "max_batch_size": 4, "cost": cost,
                   **EXTRA_QUALITY.get(tier, {})}
            for tier, (kind, model, cost) in HOSTED.items()}
