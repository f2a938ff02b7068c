"""Objects from a composed config: `hydra.utils.instantiate`, with every value of the wrong kind
named before the object is built, and the object's own refusal of a value as one line."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from captioner.core.errors import ConfigError, DataError, first_line
from captioner.core.signatures import keyword_parameters, mismatch
from captioner.core.values import short


def instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """Like `hydra.utils.instantiate`, but a `ConfigError` reaches the user unwrapped, and
    objects receive plain lists and dicts (checkpoints must not pickle OmegaConf objects)."""
    check_types(node)
    try:
        return hydra_instantiate(node, _convert_="all", **kwargs)
    except MissingMandatoryValue as err:
        raise ConfigError(
            f"{err.full_key} is required: add {err.full_key}=... to the command line."
        ) from None
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError | DataError):
            raise err.__cause__ from None
        if isinstance(err.__cause__, ValueError | TypeError):  # the class refused a value
            raise ConfigError(f"{_key(node)}: {first_line(err.__cause__)}") from None
        raise


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Callbacks or loggers: every entry of the group that has a `_target_`."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node and "_target_" in node]


def check_types(node: DictConfig) -> None:
    """A value of the wrong kind (`trainer.max_steps=abc`) is named now, with the kind its class
    takes, rather than failing in the middle of a run, or never."""
    try:
        target = get_object(node._target_)
        fields, _ = keyword_parameters(target)
    except Exception:  # no `_target_`, or hints that cannot be resolved: nothing to check
        return
    given = [name for name in fields if name in node and not OmegaConf.is_missing(node, name)]
    if not given:
        return
    values = OmegaConf.to_container(node, resolve=True)
    assert isinstance(values, dict)
    for name in given:
        expected = mismatch(fields[name], values[name])
        if expected is not None:
            raise ConfigError(f"{_key(node)}.{name}={short(values[name])}: must be {expected}.")


def _key(node: DictConfig) -> str:
    return node._get_full_key(None) or "the config"
