"""A tiny name -> object registry filled by a decorator (cf. ``torch.distributions.kl.register_kl``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; an unknown name raises :class:`ConfigError` listing the valid ones.

    An entry may declare its options: a frozen dataclass (see :mod:`vaelab.options`), given
    as ``register(name, options=...)`` or as the entry's ``Options`` attribute;
    :meth:`options` returns it (:class:`~vaelab.options.NoOptions` when there is none).

    Example::

        LIKELIHOODS = Registry("likelihood")

        @LIKELIHOODS.register("bernoulli")
        class Bernoulli:
            Options = BernoulliOptions
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._options: dict[str, type] = {}

    def register(self, name: str, options: type | None = None) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            if options is not None:
                self._options[name] = options
            return obj

        return decorator

    def options(self, name: str) -> type:
        """The options dataclass of ``name`` (ConfigError for an unknown name)."""
        from .options import NoOptions

        entry = self[name]
        return self._options.get(name) or getattr(entry, "Options", None) or NoOptions

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(sorted(self._entries))
            raise ConfigError(f"unknown {self.kind} {name!r}: choose one of {valid}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)
