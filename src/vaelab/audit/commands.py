"""What ``vaelab audit --loss`` and ``vaelab audit --preset`` print.

``--loss`` imports the user's file or module and runs the function (see
:mod:`vaelab.audit.load`); nothing here is imported unless the command asks for it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from .explain import Audit, probe
from .load import infer_roles, load_loss, parse_fixed_kwargs, parse_roles
from .presets import LOSS_PRESETS, audit_preset

__all__ = ["loss_command", "preset_command"]


def _print_audit(result: Audit) -> None:
    print("What was measured:")
    for line in result.observations:
        print(f"  - {line}")
    print()
    print(result.text)


def loss_command(spec: str, data_shape: tuple[int, ...], latent_dim: int, *,
                 roles: str | None, fixed: Sequence[str], batch_size: int | None,
                 framework: str, data: str | None, json_output: bool) -> int:
    """``--loss SPEC``: import it (this runs the user's code), probe it, print; returns 0.

    Roles come from ``roles`` (``"x_hat,x,mu,logvar"``), else from the function's
    parameter names, else the default ``x,x_hat,mu,logvar``; the output says which.

    Raises:
        ConfigError: from loading or probing (one line; the CLI exits with status 2).
    """
    fn = load_loss(spec)
    if roles:
        chosen, said = parse_roles(roles), "as given"
    else:
        inferred = infer_roles(fn)
        said = "from the parameter names" if inferred else "the default; pass --roles to change"
        chosen = inferred or ("x", "x_hat", "mu", "logvar")
    result = probe(fn, data_shape=data_shape, latent_dim=latent_dim, roles=chosen,
                         batch_size=batch_size, framework=framework, data=data,
                         **parse_fixed_kwargs(fixed))
    if json_output:
        print(json.dumps({"loss": spec, "roles": list(chosen), **result.to_dict()}, indent=2))
        return 0
    print(f"Probed {spec}({', '.join(chosen)}) [roles {said}], data shape "
          f"{','.join(map(str, data_shape))}, latent dim {latent_dim}.")
    _print_audit(result)
    return 0


def preset_command(name: str, *, json_output: bool) -> int:
    """``--preset NAME``: the audit of a widely copied loss (``list``: all of them)."""
    if name == "list":
        for preset_name in LOSS_PRESETS:
            print(f"{preset_name}: {LOSS_PRESETS[preset_name].optimises}")
        return 0
    preset = LOSS_PRESETS[name]
    result = audit_preset(name)
    if json_output:
        print(json.dumps({"preset": preset.name, "source": preset.source,
                          **result.to_dict()}, indent=2))
        return 0
    print(f"Preset {preset.name}: {preset.source}.")
    _print_audit(result)
    return 0
