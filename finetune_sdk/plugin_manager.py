"""Finding, loading and asking plugins.

Builtin plugins come from an explicit list; third-party plugins from the ``finetune_sdk`` entry-point group,
each loaded in its own ``try``/``except`` so a broken one is reported and everything else keeps working.

Environment switches:

* ``FINETUNE_SDK_DISABLE_PLUGIN_AUTOLOAD=1``: don't load entry points (builtins only).
* ``FINETUNE_SDK_PLUGINS=a,b``: load only these entry points.
* ``FINETUNE_SDK_STRICT_PLUGINS=1``: a broken plugin is an error instead of a warning.
* ``FINETUNE_SDK_TRACE_HOOKS=1``: print each hook call and its implementations to stderr.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from finetune_sdk import hookspecs
from finetune_sdk.errors import ConfigError, PluginError, unknown_name_error
from finetune_sdk.exporting.exporter import Exporter
from finetune_sdk.federated.strategy import FederatedStrategy
from finetune_sdk.formatter import Formatter
from finetune_sdk.objectives.base import Objective
from finetune_sdk.plugin_api import PluginWarning
from finetune_sdk.quantizer import Quantizer
from finetune_sdk.technique import Technique

ENTRY_POINT_GROUP = "finetune_sdk"
#: The plugin API this version of the SDK offers. A plugin may declare the range it supports with a module
#: attribute ``FINETUNE_SDK_PLUGIN_API = (min, max)`` (inclusive).
PLUGIN_API_VERSION = 1

BUILTIN_PLUGINS: tuple[str, ...] = (
    "finetune_sdk.plugins.techniques",
    "finetune_sdk.plugins.quantizers",
    "finetune_sdk.plugins.formatters",
    "finetune_sdk.federated.strategies",
    "finetune_sdk.objectives.builtin",
    "finetune_sdk.exporting.gguf_exporter",
)

#: Each kind's register hook and the base class of what it registers (None: a function, e.g. a reward function).
KINDS: dict[str, tuple[str, type | None]] = {
    "technique": ("register_techniques", Technique),
    "quantizer": ("register_quantizers", Quantizer),
    "formatter": ("register_formatters", Formatter),
    "strategy": ("register_federated_strategies", FederatedStrategy),
    "reward": ("register_reward_functions", None),
    "objective": ("register_objectives", Objective),
    "exporter": ("register_exporters", Exporter),
}
#: The plural of each kind, as ``finetune plugins`` titles its tables.
PLURALS = {"technique": "techniques", "quantizer": "quantizers", "formatter": "formatters",
           "strategy": "strategies", "reward": "rewards", "objective": "objectives", "exporter": "exporters"}


#: The hooks that register classes; every other hook is an observer called through :meth:`PluginHost.notify`.
REGISTER_HOOKS = frozenset(hook for hook, _ in KINDS.values())


@dataclass(frozen=True)
class Registration:
    """A class a plugin registered under a name."""

    kind: str
    name: str
    cls: type
    plugin: str
    distribution: str
    version: str


@dataclass
class PluginInfo:
    """A loaded (or failed) plugin, as ``finetune plugins`` shows it."""

    name: str
    distribution: str
    version: str
    builtin: bool
    hooks: list[str] = field(default_factory=list)
    registered: list[str] = field(default_factory=list)
    error: str | None = None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


class PluginHost:
    """The loaded plugins and everything they registered.

    Example:
        >>> from finetune_sdk.plugin_manager import get_plugin_host
        >>> "lora" in get_plugin_host().names("technique")
        True
    """

    def __init__(self, *, autoload: bool | None = None) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.strict = _env_flag("FINETUNE_SDK_STRICT_PLUGINS")
        self.plugins: list[PluginInfo] = []
        self._registrations: dict[str, dict[str, list[Registration]]] = {kind: {} for kind in KINDS}
        self.tracing = _env_flag("FINETUNE_SDK_TRACE_HOOKS")
        for module_name in BUILTIN_PLUGINS:
            self._add(module_name, lambda m=module_name: importlib.import_module(m), "finetune-sdk", builtin=True)
        if autoload is None:
            autoload = not _env_flag("FINETUNE_SDK_DISABLE_PLUGIN_AUTOLOAD")
        if autoload:
            only = {n.strip() for n in os.environ.get("FINETUNE_SDK_PLUGINS", "").split(",") if n.strip()}
            for ep in discover_entry_points():
                if only and ep.name not in only:
                    continue
                dist = ep.dist.name if ep.dist is not None else "unknown"
                self._add(ep.name, ep.load, dist, builtin=False)
        for kind in KINDS:
            self._collect(kind)

    # -- loading -------------------------------------------------------------------------------------------
    def _report(self, info: PluginInfo, message: str) -> None:
        info.error = message
        text = f"plugin {info.name!r} from {info.distribution} {info.version}: {message}"
        if self.strict:
            raise PluginError(text)
        warnings.warn(text, PluginWarning, stacklevel=3)

    def _add(self, name: str, load: Callable[[], Any], distribution: str, *, builtin: bool) -> None:
        version = _version_of(distribution)
        info = PluginInfo(name=name, distribution=distribution, version=version, builtin=builtin)
        self.plugins.append(info)
        try:
            module = load()
            supported = getattr(module, "FINETUNE_SDK_PLUGIN_API", None)
            if isinstance(supported, int):
                supported = (supported, supported)
            if supported is not None and not (isinstance(supported, tuple) and len(supported) == 2):
                raise PluginError("FINETUNE_SDK_PLUGIN_API must be an int or a (min, max) tuple, got "
                                  f"{supported!r}")
            if supported is not None and not (supported[0] <= PLUGIN_API_VERSION <= supported[1]):
                raise PluginError(
                    f"supports plugin API {supported[0]}..{supported[1]}, this SDK offers {PLUGIN_API_VERSION}"
                )
            self.pm.register(module, name=name)
            try:
                self.pm.check_pending()
            except pluggy.PluginValidationError as exc:
                self.pm.unregister(module)
                raise PluginError(str(exc)) from None
            if not builtin:
                self._isolate(module, info)
            info.hooks = sorted(impl for impl in _hooks_of(self.pm, module))
        except Exception as exc:  # noqa: BLE001 - one broken plugin must not take the SDK down
            if builtin:
                raise
            self._report(info, f"failed to load: {type(exc).__name__}: {exc}")

    def _isolate(self, module: Any, info: PluginInfo) -> None:
        """Wrap each observer hook implementation of a third-party plugin so that an exception in it is reported
        (naming the plugin and its distribution) and the other implementations still run. The implementations stay
        in pluggy's hook callers, so pluggy's own calling decides the order (``tryfirst``/``trylast``, last
        registered first) and runs hook wrappers (``wrapper=True``, ``hookwrapper=True``) around them."""
        for caller in self.pm.get_hookcallers(module) or []:
            if caller.name in REGISTER_HOOKS:
                continue  # called one by one in _collect, each in its own try/except
            for impl in caller.get_hookimpls():
                if impl.plugin is module and not (impl.wrapper or impl.hookwrapper):
                    impl.function = self._guarded(impl.function, info, caller.name)

    def _guarded(self, function: Callable[..., Any], info: PluginInfo, hook_name: str) -> Callable[..., Any]:
        def guarded(*args: Any) -> Any:
            try:
                return function(*args)
            except Exception as exc:  # noqa: BLE001 - a failing observer must not stop training
                self._report(info, f"hook {hook_name} raised {type(exc).__name__}: {exc}")
                return None

        guarded.__wrapped__ = function  # type: ignore[attr-defined]
        return guarded

    def _collect(self, kind: str) -> None:
        hook_name, base = KINDS[kind]
        impls = getattr(self.pm.hook, hook_name).get_hookimpls()
        self._trace(hook_name, impls)
        for impl in impls:
            info = self._info(impl.plugin_name)

            def register(cls: Any, name: str | None = None, _info: PluginInfo = info) -> None:
                name = _registered_name(kind, base, cls, name)
                reg = Registration(kind, name, cls, _info.name, _info.distribution, _info.version)
                taken = self._registrations[kind].setdefault(name, [])
                taken.append(reg)
                _info.registered.append(f"{kind}:{name}")
                if len(taken) > 1:
                    first = taken[0]
                    self._report(_info, f"registers {kind} {name!r}, already registered by plugin "
                                        f"{first.plugin!r} ({first.distribution} {first.version}); using it is an "
                                        "error until one is uninstalled")

            try:
                impl.function(register=register)
            except Exception as exc:  # noqa: BLE001
                if info.builtin:
                    raise
                self._report(info, f"hook {hook_name} raised {type(exc).__name__}: {exc}")

    def _trace(self, hook_name: str, impls: list[Any]) -> None:
        if self.tracing:
            names = ", ".join(impl.plugin_name for impl in impls) or "no implementations"
            sys.stderr.write(f"finetune_sdk: hook {hook_name} -> {names}\n")

    def _info(self, plugin_name: str) -> PluginInfo:
        return next(p for p in self.plugins if p.name == plugin_name)

    # -- queries -------------------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        """Registered names of a kind (``technique``, ``quantizer``, ``formatter``, ``strategy``, ``reward``,
        ``objective`` or ``exporter``), sorted."""
        return sorted(self._registrations[kind])

    def registration(self, kind: str, name: str) -> Registration:
        """The registration of ``name``; an error when unknown or registered by two plugins."""
        regs = self._registrations[kind].get(name)
        if not regs:
            raise unknown_name_error(kind, name, self.names(kind))
        if len(regs) > 1:
            who = " and ".join(f"plugin {r.plugin!r} ({r.distribution} {r.version})" for r in regs)
            raise ConfigError(f"{kind} {name!r} is registered by both {who}; uninstall one of them")
        return regs[0]

    def create(self, kind: str, name: str) -> Any:
        """Instantiate the class registered as ``name``."""
        reg = self.registration(kind, name)
        try:
            return reg.cls()
        except Exception as exc:  # noqa: BLE001
            raise PluginError(
                f"{kind} {name!r} from plugin {reg.plugin!r} ({reg.distribution}) failed to start: {exc}"
            ) from exc

    def registrations(self, kind: str) -> list[Registration]:
        """Every registration of a kind, conflicts included."""
        return [r for regs in self._registrations[kind].values() for r in regs]

    def notify(self, hook_name: str, **kwargs: Any) -> list[Any]:
        """Call an observer hook through pluggy, in pluggy's order: ``tryfirst`` implementations first, then the
        most recently registered, ``trylast`` ones last, with hook wrappers around them. A third-party
        implementation that raises is reported (a warning naming the plugin and its distribution; an error in
        strict mode) and the others still run. Returns the implementations' answers that are not None (an
        observer may answer ``STOP_TRAINING``, see :data:`finetune_sdk.plugin_api.STOP_TRAINING`)."""
        caller = getattr(self.pm.hook, hook_name)
        self._trace(hook_name, list(reversed(caller.get_hookimpls())))  # the order pluggy calls them in
        return list(caller(**kwargs) or [])

    def add_commands(self, cli: Any) -> None:
        """Let plugins add CLI commands."""
        self.notify("register_commands", cli=cli)


def _registered_name(kind: str, base: type | None, registered: Any, name: str | None) -> str:
    """The name ``registered`` goes under: a class's ``name``; a function's ``name=`` or ``__name__``."""
    if base is None:
        if not callable(registered) or isinstance(registered, type):
            raise PluginError(f"register() takes a {kind} function, got {registered!r}")
        name = name or getattr(registered, "__name__", None)
        if not isinstance(name, str) or not name or name == "<lambda>":
            raise PluginError(f"register() needs name= for {registered!r}")
        return name
    if not (isinstance(registered, type) and issubclass(registered, base)) or not getattr(registered, "name", None):
        raise PluginError(f"register() takes a {base.__name__} subclass with a name, got {registered!r}")
    return str(registered.name)


def discover_entry_points() -> list[Any]:
    """The installed ``finetune_sdk`` entry points (third-party plugins)."""
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def _hooks_of(pm: pluggy.PluginManager, module: Any) -> list[str]:
    return [caller.name for caller in pm.get_hookcallers(module) or []]


def _version_of(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


_HOST: PluginHost | None = None


def get_plugin_host() -> PluginHost:
    """The process-wide :class:`PluginHost`, loaded on first use."""
    global _HOST
    if _HOST is None:
        _HOST = PluginHost()
    return _HOST


def reset_plugins() -> None:
    """Forget the loaded plugins (tests, or after installing a plugin in a running process)."""
    global _HOST
    _HOST = None
