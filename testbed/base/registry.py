"""Things registered by name (topologies, experiments, workloads, probes), and
validated parameters for them: one mechanism for all four.

    PROBES = Registry("probe", "testbed.harness.probes", skip={"base"})

    @PROBES.register
    class Nstat(Probe): name = "nstat"; ...

    PROBES.get("nstat", interval_ms=50)   # an instance, parameters validated
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from testbed.base.errors import TestbedError, format_validation_error
from testbed.base.strict import Strict

T = TypeVar("T")


class Parametrized:
    """A registered thing with a validated `Params` model; errors name the field."""

    kind: ClassVar[str] = "component"
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = Strict

    def __init__(self, **params: Any):
        self.params = self.validate_params(params)

    @classmethod
    def validate_params(cls, params: dict[str, Any]) -> Any:
        """Validate params with the class's Params model; TestbedError naming the field."""
        try:
            return cls.Params(**params)
        except ValidationError as exc:
            raise TestbedError(format_validation_error(f"{cls.kind} {cls.name!r}", exc)) from None


class Registry(Generic[T]):
    """Classes registered by name, discovered from their package on first use."""
    def __init__(self, kind: str, package: str, skip: frozenset[str] | set[str] = frozenset()):
        self.kind = kind
        self.package = package
        self.skip = set(skip)
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: register cls under its `name`."""
        name = getattr(cls, "name", "")
        if not name:
            raise TypeError(f"{cls.__name__} needs a name")
        self._classes[name] = cls
        return cls

    def _discover(self) -> None:
        """Import every module of the package: each registers what it defines."""
        pkg = importlib.import_module(self.package)
        for mod in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
            if mod.name not in self.skip:
                importlib.import_module(f"{self.package}.{mod.name}")

    def cls(self, name: str) -> type[T]:
        """The class registered under name; TestbedError listing the known names."""
        self._discover()
        if name not in self._classes:
            known = ", ".join(sorted(self._classes))
            raise TestbedError(f"unknown {self.kind} {name!r} (known: {known})")
        return self._classes[name]

    def get(self, name: str, **params: Any) -> T:
        """A new instance by name, with validated parameters."""
        return self.cls(name)(**params)

    def available(self) -> dict[str, str]:
        """Registered names with their descriptions."""
        self._discover()
        return {n: getattr(c, "description", "") for n, c in sorted(self._classes.items())}

    def __contains__(self, name: str) -> bool:
        self._discover()
        return name in self._classes
