"""torch's parametrizations of a module, read from the module itself.

``torch.nn.utils.parametrize.is_parametrized`` (and ``type_before_parametrizations``) read
``module.parametrizations`` with ``getattr``; a module whose ``__getattr__`` forwards unknown
names to a layer it holds (a wrapper around one ``nn.Linear``) answers with that layer's, and
looks parametrized itself.  These read the module's own submodules.
"""

from __future__ import annotations

from torch import nn

__all__ = ["is_parametrized", "own_chains", "own_class", "plain_type"]


def own_chains(module: nn.Module) -> nn.ModuleDict | None:
    """``module.parametrizations`` (one chain per parametrized tensor) if ``module`` itself has any."""
    modules = module._modules  # (a ScriptModule's is no dict: no .get)
    chains = modules["parametrizations"] if "parametrizations" in modules else None
    return chains if isinstance(chains, nn.ModuleDict) and len(chains) else None


def is_parametrized(module: nn.Module, name: str | None = None) -> bool:
    """Whether ``module`` has a parametrization (on ``module.<name>``, if given)."""
    chains = own_chains(module)
    return chains is not None and (name is None or name in chains)


def plain_type(module: nn.Module) -> type:
    """``module``'s class before torch made it one of its own for its parametrizations."""
    return type(module).__bases__[0] if is_parametrized(module) else type(module)


def own_class(cls: type) -> type:
    """A class with ``cls``'s name, bases and attributes (its properties included): for the copy of
    a parametrized module, whose generated class ``copy.deepcopy`` would share with the original."""
    namespace = {key: value for key, value in vars(cls).items() if key not in ("__dict__", "__weakref__")}
    return type(cls.__name__, cls.__bases__, namespace)
