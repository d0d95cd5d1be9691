"""A run's settings from Flower's ``context.run_config`` ([tool.flwr.app.config] + ``--run-config``).

Every RunConfig field is a flat key with dashes (``clients-per-round = 10``), so one field can be
overridden on the command line; ``target-modules`` and ``layers`` are space-separated strings ("" =
the default), ``label-column = "none"`` means plain text and ``"auto"`` leaves an optional setting
(``perturbations``, ``lr``, ...) to the default recipe. ``run-config`` (JSON, or a path to a JSON
file) sets several fields at once and takes precedence over the flat keys. The Flower options of
:data:`FLOWER_DEFAULTS` configure the transport.
"""
from __future__ import annotations

import dataclasses
import json
import typing

from ..config import RunConfig
from ..methods import flower_methods, method

# Flower run-config keys of the transport and their defaults.
FLOWER_DEFAULTS = {
    "run-config": "{}",  # RunConfig fields as JSON, or a path to a JSON file
    "round-timeout": 600.0,  # seconds to wait for replies; a node that has not answered is a dropout
    "node-timeout": 120.0,  # seconds to wait for the SuperNodes to connect and report their partition id
    "poll-interval": 0.2,  # seconds between pulls for replies
}


def flat_key(name: str) -> str:
    return name.replace("_", "-")


def _field_value(f: dataclasses.Field, v):
    """A flat Flower value (bool/int/float/str) as the RunConfig field `f` holds it."""
    hint = typing.get_type_hints(RunConfig)[f.name]
    if f.name in ("target_modules", "layers"):
        if not isinstance(v, str):
            raise ValueError(f"{flat_key(f.name)}: expected a space-separated string, got {v!r}")
        try:
            items = [int(x) for x in v.split()] if f.name == "layers" else v.split()
        except ValueError:
            raise ValueError(f"{flat_key(f.name)}: expected block indices, got {v!r}") from None
        return items or None
    if f.name == "label_column":
        return None if str(v).lower() == "none" else str(v)
    optional = typing.get_origin(hint) is typing.Union
    if optional and v == "auto":  # left to the default recipe (None in RunConfig)
        return None
    base = typing.get_args(hint)[0] if optional else hint
    if base is bool:
        if not isinstance(v, bool):
            raise ValueError(f"{flat_key(f.name)}: expected true or false, got {v!r}")
        return v
    if base is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{flat_key(f.name)}: expected an integer, got {v!r}")
        return v
    if base is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{flat_key(f.name)}: expected a number, got {v!r}")
        return float(v)
    return str(v)


def parse_run_config(run_config) -> tuple:
    """(RunConfig, Flower options) from a Flower ``context.run_config``."""
    run_config = dict(run_config)
    opts = dict(FLOWER_DEFAULTS)
    opts.update({k: v for k, v in run_config.items() if k in FLOWER_DEFAULTS})
    by_key = {flat_key(f.name): f for f in dataclasses.fields(RunConfig)}
    unknown = sorted(k for k in run_config if k not in by_key and k not in FLOWER_DEFAULTS)
    if unknown:
        raise ValueError(f"run config: unknown keys {unknown} (RunConfig fields with dashes, or "
                         f"{', '.join(FLOWER_DEFAULTS)})")
    fields = {by_key[k].name: _field_value(by_key[k], v) for k, v in run_config.items() if k in by_key}
    raw = str(opts["run-config"]).strip()
    if raw.startswith("{"):
        given = json.loads(raw)
    else:
        with open(raw) as f:
            given = json.load(f)
    names = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"run-config: unknown RunConfig fields {unknown}")
    fields.update(given)
    cfg = RunConfig(**fields)
    row = method(cfg.method)
    if not row.flower:
        raise ValueError(f"method {cfg.method!r}: the Flower runner carries seed-and-scalar rounds only; use one of "
                         f"{', '.join(flower_methods())} (or the embedded runner, fwdkern train)")
    for k in ("round-timeout", "node-timeout", "poll-interval"):
        opts[k] = float(opts[k])
    return cfg, opts


def config_key(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_json(), sort_keys=True)
