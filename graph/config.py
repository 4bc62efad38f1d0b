"""Serve-config files as data: load a profile, validate its app args and routing policy without Ray."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PRICE_MAX_AGE_DAYS = 90  # a hosted tier's price checked longer ago than this is flagged by `python -m graph.config`


def load_serve_config(path: str | Path) -> dict:
    return yaml.safe_load(Path(path).read_text())


def prism_app(config: dict, name: str = "prism") -> dict:
    """The Prism application block of a serve config."""
    for app in config.get("applications", []):
        if app.get("name") == name:
            return app
    raise ValueError(f"no application named {name!r} in the serve config")


def deployment_block(app: dict, name: str) -> dict:
    for d in app.get("deployments", []):
        if d.get("name") == name:
            return d
    return {}


def validate_profile(path: str | Path) -> list[str]:
    """Every problem in a profile (app args, routing policy vs tiers); empty when it is deployable."""
    from graph.routing import load_policy
    from graph.settings import AppArgs, generator_deployment_name

    problems = []
    app = prism_app(load_serve_config(path))
    try:
        args = AppArgs.model_validate(app.get("args", {}))
    except Exception as e:
        return [f"args: {e}"]
    ingress = deployment_block(app, "Ingress")
    try:
        policy = load_policy((ingress.get("user_config") or {}).get("routing", {}), tiers=set(args.tiers))
        specs = {t: s.model_dump() for t, s in args.tiers.items()}
        problems += autoscaling_problems(app, specs, policy.admission.max_slowdown)
        problems += concurrency_problems(app, specs, policy.admission.max_slowdown)
    except ValueError as e:
        problems.append(str(e))
    known = {"Ingress",
             *(generator_deployment_name(t) for t in args.tiers)}
    for d in app.get("deployments", []):
        if d.get("name") not in known:
            problems.append(f"deployments: {d.get('name')!r} is not a deployment of this app ({sorted(known)})")
    return problems


def concurrency_problems(app: dict, tiers: dict[str, dict], max_slowdown: float) -> list[str]:
    """A generator's max_ongoing_requests must be its admission slots. Fewer: admitted renders wait in Serve's queue
    behind the cap. More, for a model that shares its replica's engine: Serve's router (its replica queue lengths
    cached up to 10 s) can put a second render on a busy replica while another replica idles, and the second waits
    out the first (seen in make loadtest: a 2.8-s render, then 2.9 s more, with a replica free). A hosted API's
    calls run side by side, so its replicas may take more than their slots."""
    from engines.generators import REMOTE_KINDS
    from graph.admission import tier_slots
    from graph.settings import generator_deployment_name

    out = []
    for tier, spec in tiers.items():
        name = generator_deployment_name(tier)
        ongoing, slots = deployment_block(app, name).get("max_ongoing_requests"), tier_slots(spec, max_slowdown)
        if ongoing is None:
            continue
        if ongoing < slots or (ongoing > slots and spec.get("kind") not in REMOTE_KINDS):
            out.append(f"deployments: {name} max_ongoing_requests is {ongoing}, but admission gives a replica {slots} "
                       f"slot(s) (batch_efficiency {spec.get('batch_efficiency')}, max_slowdown {max_slowdown:g}): set "
                       f"it to {slots}")
    return out


def autoscaling_problems(app: dict, tiers: dict[str, dict], max_slowdown: float) -> list[str]:
    """An autoscaled tier whose target_ongoing_requests is not below its admission slots never scales out: admission
    never lets a replica hold more than its slots, so the autoscaler never sees it past its target."""
    from graph.admission import tier_slots
    from graph.settings import generator_deployment_name

    out = []
    for tier, spec in tiers.items():
        auto = deployment_block(app, generator_deployment_name(tier)).get("autoscaling_config") or {}
        target, slots = auto.get("target_ongoing_requests"), tier_slots(spec, max_slowdown)
        if auto.get("max_replicas", 1) > auto.get("min_replicas", 1) and target is not None and target >= slots:
            out.append(f"deployments: Generator_{tier} autoscales at target_ongoing_requests {target:g}, but admission "
                       f"gives a replica {slots} slot(s): set the target below {slots} or it never scales out")
    return out


def profile_warnings(path: str | Path) -> list[str]:
    """What a deployable profile should still fix: hosted models announced for retirement, prices checked long ago."""
    from engines.generators import REMOTE_KINDS, ModelSpec
    from engines.remote import lifecycle_warning
    from graph.lifecycle import today

    warnings = []
    for tier, raw in (prism_app(load_serve_config(path)).get("args", {}).get("tiers") or {}).items():
        spec = ModelSpec.model_validate(raw)
        if spec.kind not in REMOTE_KINDS:
            continue
        if (warning := lifecycle_warning(spec)) is not None:
            warnings.append(f"tiers.{tier}: {warning}")
        checked = spec.cost.checked
        if checked is not None and (today() - checked).days > PRICE_MAX_AGE_DAYS:
            warnings.append(f"tiers.{tier}: its price was checked on {checked.isoformat()}, more than "
                            f"{PRICE_MAX_AGE_DAYS} days ago: check it again at {spec.cost.source}")
    return warnings


if __name__ == "__main__":
    # python -m graph.config serve_config.yaml: check a profile (and its routing policy) before `serve deploy`.
    bad = 0
    for p in sys.argv[1:] or [str(ROOT / "serve_config.yaml")]:
        problems = validate_profile(p)
        print(f"{p}: {'ok' if not problems else 'INVALID'}")
        for prob in problems:
            print(f"  - {prob}")
        for warning in [] if problems else profile_warnings(p):
            print(f"  ! {warning}")
        bad += bool(problems)
    sys.exit(1 if bad else 0)
