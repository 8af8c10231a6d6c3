"""Finding the loss function that ``vaelab audit --loss SPEC`` probes.

**Loading a loss runs its code**: importing ``path/to/file.py`` or ``package.module``
executes it in the current process, with your permissions. It happens only when asked
with ``--loss``, never from a config file or a checkpoint; audit code you trust (your own).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["ROLE_NAMES", "infer_roles", "load_loss", "parse_fixed_kwargs", "parse_roles"]

#: Parameter names that say which role an argument plays (lower case).
ROLE_NAMES = {
    "x": ("x", "input", "inputs", "data", "y_true", "target", "targets", "true_images",
          "images", "x_true", "original"),
    "x_hat": ("x_hat", "xhat", "recon_x", "x_recon", "recon", "recons", "reconstruction",
              "reconstructions", "reconstructed_images", "y_pred", "output", "outputs",
              "x_decoded_mean", "x_rec", "pred", "prediction", "logits", "x_logits", "decoded"),
    "mu": ("mu", "z_mean", "mean", "z_mu", "mu_z", "means"),
    "logvar": ("logvar", "log_var", "z_log_var", "z_logvar", "logvar_z", "z_log_sigma",
               "log_sigma2", "lv"),
    "z": ("z", "z_sample", "z_sampled"),
}


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"--loss: no file {path} (give FILE.py:FUNCTION or "
                          "package.module:FUNCTION)")
    name = f"vaelab_audited_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--loss: {path} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent.resolve()))  # its sibling modules
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent.resolve()))
    return module


def load_loss(spec: str) -> Callable[..., Any]:
    """The function named by ``spec``: ``path/to/file.py:function`` or
    ``package.module:function`` (a dotted name after the colon reaches into a class).

    Importing runs the module's code (see the module docstring). ``KERAS_BACKEND``
    defaults to ``torch`` first, so that Keras 3 imports without TensorFlow.

    Raises:
        ConfigError: a malformed spec, a missing file, module or function, or an
            exception while importing (shown in one line).
    """
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ConfigError(f"--loss {spec!r}: give FILE.py:FUNCTION or package.module:FUNCTION, "
                          "e.g. my_vae.py:loss_function or keras.losses:binary_crossentropy")
    os.environ.setdefault("KERAS_BACKEND", "torch")
    is_file = where.endswith(".py") or os.sep in where or "/" in where
    try:
        module = _import_file(Path(where)) if is_file else importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as exc:  # the user's code: any exception, in one line
        raise ConfigError(f"--loss: importing {where} failed: {_one_line(exc)}") from None
    target: Any = module
    for part in name.split("."):
        if not hasattr(target, part):
            found = sorted(n for n, v in vars(module).items()
                           if callable(v) and not n.startswith("_"))[:8]
            raise ConfigError(f"--loss: {where} has no {name!r} (callables there: "
                              f"{', '.join(found) or 'none'})")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"--loss: {where}:{name} is a {type(target).__name__}, not a function")
    return target


def infer_roles(fn: Callable[..., Any]) -> tuple[str, ...] | None:
    """Roles from the names of ``fn``'s required positional parameters, or None.

    ``loss_function(recon_x, x, mu, logvar)`` gives ``("x_hat", "x", "mu", "logvar")``;
    ``binary_crossentropy(y_true, y_pred, from_logits=False)`` gives ``("x", "x_hat")``.
    None when a name is not recognised, a role repeats, or there are no named parameters
    (``*args``).
    """
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    positional = [p for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                  and p.default is p.empty and p.name not in ("self", "cls")]
    lookup = {n: role for role, names in ROLE_NAMES.items() for n in names}
    roles = tuple(lookup.get(p.name.lower(), "") for p in positional)
    if not roles or "" in roles or len(set(roles)) != len(roles):
        return None
    return roles


def parse_roles(text: str) -> tuple[str, ...]:
    """``"x_hat,x,mu,logvar"`` -> a tuple (checked by the probe)."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_fixed_kwargs(pairs: Sequence[str]) -> dict[str, Any]:
    """``["M_N=0.00025", "reconstruction_loss=bce"]`` -> keyword arguments.

    Values are Python literals (numbers, True/False/None, quoted strings, lists) when
    they parse as one, else plain strings.

    Raises:
        ConfigError: a pair without ``=`` or with an empty or non-identifier name.
    """
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise ConfigError(f"--set {pair!r}: give NAME=VALUE with NAME the argument's name, "
                              "e.g. --set M_N=0.00025")
        try:
            kwargs[name] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[name] = value.strip()
    return kwargs
