"""Which objective a run trains, and its options: the one place an objective is chosen, from the registry.

Objectives come from the ``register_objectives`` hook (builtins included: :mod:`finetune_sdk.objectives.builtin`).
``objective=`` names one; without it, the registered default for the rows' formatter task and the technique's task
is chosen (``preference`` rows with a generative technique: ``dpo``). An objective's options (TRL's names) are
resolved only once it is chosen: an option of another objective is refused with one line.

Example:
    >>> objective_for("preference", "causal-lm").name, objective_for("preference", "causal-lm", "orpo").name
    ('dpo', 'orpo')
    >>> resolve_objective_options(get_objective("dpo"), {"beta": "0.5"})
    {'beta': 0.5}
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any, TYPE_CHECKING

from finetune_sdk.errors import ConfigError
from finetune_sdk.objectives.base import Objective
from finetune_sdk.options import Option

if TYPE_CHECKING:
    from finetune_sdk.plugin_manager import PluginHost

_INSTANCES: dict[type, Objective] = {}


def _host(host: PluginHost | None) -> PluginHost:
    if host is not None:
        return host
    from finetune_sdk.plugin_manager import get_plugin_host

    return get_plugin_host()


def get_objective(name: str, host: PluginHost | None = None) -> Objective:
    """The objective registered as ``name`` (one instance per class); an unknown name is a
    :class:`~finetune_sdk.errors.ConfigError` suggesting the closest."""
    registration = _host(host).registration("objective", name)
    if registration.cls not in _INSTANCES:
        _INSTANCES[registration.cls] = _host(host).create("objective", name)
    return _INSTANCES[registration.cls]


def registered_objectives(host: PluginHost | None = None) -> dict[str, Objective]:
    """Every registered objective by name (names registered twice left out: using them is an error)."""
    found = _host(host)
    names = [registration.name for registration in found.registrations("objective")]
    return {name: get_objective(name, found) for name in found.names("objective") if names.count(name) == 1}


def objective_for(formatter_task: str, technique_task: str, name: str | None = None, host: PluginHost | None = None) -> Objective:
    """The objective that trains ``technique_task`` on rows a ``formatter_task`` formatter makes: ``name`` when
    given (checked to fit), else the registered default for the pair.

    Raises:
        ConfigError: ``name`` unknown or not training these tasks; no default, or several, for the pair.
    """
    if name:
        objective = get_objective(name, host)
        if formatter_task not in objective.formatter_tasks or technique_task not in objective.technique_tasks:
            raise ConfigError(
                f"objective {name!r} trains on {'/'.join(sorted(objective.formatter_tasks))} rows with a "
                f"{'/'.join(sorted(objective.technique_tasks))} technique, but this run has {formatter_task} rows "
                f"and a {technique_task} technique; pick another objective or other data")
        return objective
    found = [o for o in registered_objectives(host).values()
             if o.default and formatter_task in o.formatter_tasks and technique_task in o.technique_tasks]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConfigError(f"no objective trains a {technique_task} technique on {formatter_task} rows by default; "
                          "pass objective= (finetune plugins lists the objectives)")
    raise ConfigError(f"objectives {', '.join(o.name for o in found)} all claim to be the default for "
                      f"{formatter_task} rows; pass objective= to choose")


def objective_option_owners(host: PluginHost | None = None) -> dict[str, list[str]]:
    """Every objective option name (older names included) -> the objectives that take it."""
    owners: dict[str, list[str]] = {}
    for objective in registered_objectives(host).values():
        for option_name in [*objective.option_specs(), *objective.renamed_options]:
            owners.setdefault(option_name, []).append(objective.name)
    return owners


def objective_option_specs(host: PluginHost | None = None) -> dict[str, tuple[Option, dict[str, Option]]]:
    """Every objective option name -> (the first objective's spec, every objective's spec by objective name):
    what the CLI makes its flags from."""
    specs: dict[str, tuple[Option, dict[str, Option]]] = {}
    for objective in registered_objectives(host).values():
        for option in objective.options:
            first, each = specs.setdefault(option.name, (option, {}))
            each[objective.name] = option
    return specs


def resolve_objective_options(objective: Objective, given: Mapping[str, Any], host: PluginHost | None = None) -> dict[str, Any]:
    """``objective``'s options: the ``given`` values (coerced and range-checked by its own specs) or its defaults.

    Raises:
        ConfigError: a given name that is not one of its options (one line naming the objectives that take it).
    """
    specs, values = objective.option_specs(), {}
    for name, value in given.items():
        target = objective.renamed_options.get(name, name)
        if target not in specs:
            owners = objective_option_owners(host).get(name, [])
            whose = f"an option of objective {', '.join(map(repr, owners))}" if owners else "not an option"
            raise ConfigError(f"option {name!r} is {whose}, not of {objective.name!r}, which this run trains; drop "
                              f"it{' or pass objective=' + repr(owners[0]) if owners else ''}")
        if target != name:
            warnings.warn(f"option {name!r} is now {target!r} (TRL's name) for objective {objective.name!r}",
                          FutureWarning, stacklevel=3)
        values[target] = value
    return {name: spec.coerce(values[name]) if name in values else spec.default for name, spec in specs.items()}


def split_objective_options(options: Mapping[str, Any], host: PluginHost | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` as (the others, the objective options given): the names :func:`objective_option_owners` knows."""
    owners = objective_option_owners(host)
    given = {k: v for k, v in options.items() if k in owners}
    return {k: v for k, v in options.items() if k not in owners}, given


def run_options(objective: Objective, options: Mapping[str, Any], host: PluginHost | None = None, *,
                strict: bool = True) -> dict[str, Any]:
    """A run's options: ``options`` (the Trainer's, which hold the objective options as given) with
    ``objective``'s resolved and no other objective's. An option of another objective is an error, or with
    ``strict=False`` (a stage of ``fit([Stage, ...])``, where the Trainer's options serve every stage) left out of
    this run with an info line."""
    plain, given = split_objective_options(options, host)
    if not strict:
        takes = {*objective.option_specs(), *objective.renamed_options}
        skipped = sorted(name for name in given if name not in takes)
        if skipped:
            logging.getLogger("finetune_sdk").info("options %s are not options of objective %r: not used in this "
                                                   "stage", ", ".join(skipped), objective.name)
        given = {k: v for k, v in given.items() if k in takes}
    return {**plain, **resolve_objective_options(objective, given, host)}
