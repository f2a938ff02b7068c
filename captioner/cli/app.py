"""The Hydra scripts' front door: `--help` that lists only what a script uses, and the command
line checked before any work starts, so a typo is one line naming the closest valid key.

Hydra composes the config inside `hydra.main` and reports a mistyped key as a trimmed
traceback (`Key 'trian_file' is not in struct`). Here the same composition runs first, with
Hydra's own compose API, and a failure becomes a `ConfigError` that says what to type instead.
Only hydra, omegaconf and the standard library are imported, so `--help` is instant.
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra import main
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from captioner.cli.config import CONF_DIR, compose, initialized
from captioner.cli.console import user_errors
from captioner.core.errors import ConfigError, first_line

HIDDEN_GROUPS = {"hydra", "paths"}  # set up once per installation, not per run


def run(config_name: str, task: Callable[[DictConfig], Any], doc: str) -> None:
    """Check the command line, then hand it to Hydra to run `task` on the composed config;
    what `task` returns goes to Hydra's sweeper (the metric an Optuna sweep optimises).

    `doc` is the script's docstring, the top of its `--help`. Run folders go under
    `${paths.root_dir}/logs`: the current folder's, or `CAPTIONER_ROOT`'s when it is set.
    """
    argv = ckpt_flag(sys.argv[1:]) if config_name == "eval" else sys.argv[1:]
    args = get_args_parser().parse_args(argv)
    if args.help:
        print(usage(config_name, doc))
        sys.exit(0)
    if not (args.hydra_help or args.info or args.shell_completion or args.cfg):
        with user_errors():
            check_overrides(config_name, args.overrides)
    sys.argv = [sys.argv[0], *argv]
    import lightning  # noqa: F401  # before Hydra's logging: Lightning keeps its own console lines

    def job(cfg: DictConfig) -> Any:
        log_to_run_file()
        with user_errors(run_log()):
            return task(cfg)

    main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(job)()


def invocation(command: str) -> str:
    """How to type `command` (train, caption, ...) the way this process was started: `python -m
    captioner.cli.caption` after `python -m captioner.cli.train`, else `python scripts/caption.py`
    in the folder of the script that was run, for `--help` and the hints that name a command."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name.startswith("captioner.cli."):
        return f"python -m captioner.cli.{command}"
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0].endswith(".py") else None
    if script is not None and script.parent.name == "scripts":
        return f"python {script.parent / f'{command}.py'}"
    return f"python scripts/{command}.py"


def ckpt_flag(argv: Sequence[str]) -> list[str]:
    """`--ckpt PATH` (as `caption.py` and `export.py` take it) -> `ckpt_path=PATH`."""
    out, rest = [], list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--ckpt" and rest:
            arg = "=" + rest.pop(0)
        elif arg.startswith("--ckpt="):
            arg = arg[len("--ckpt") :]
        else:
            out.append(arg)
            continue
        path = arg[1:].replace("\\", "\\\\").replace("'", "\\'")
        out.append(f"ckpt_path='{path}'")  # quoted: a path may hold '=', ',' or spaces
    return out


def log_to_run_file() -> None:
    """The run folder's `<task_name>.log` gets what the console shows from Lightning and
    Python warnings too, not only the package's own log records."""
    logging.captureWarnings(True)
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in files:
            if handler not in logger.handlers:
                logger.addHandler(handler)


def run_log() -> Path | None:
    """The run's log file, where the final report is appended too (None outside a Hydra run)."""
    if not HydraConfig.initialized():
        return None
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    return Path(files[0].baseFilename) if files else None


# --- --help ----------------------------------------------------------------------------------


def usage(config_name: str, doc: str) -> str:
    """The script's docstring, the config groups it takes with their options, and its own keys
    as the config file comments them."""
    script = invocation(config_name)
    lines = [doc.strip(), "", f"usage: {script} [GROUP=OPTION ...] [KEY=VALUE ...]", ""]
    lines.append("config groups (GROUP=OPTION; the default in brackets):")
    for group, default in _groups_used(config_name):
        options = ", ".join(f"[{o}]" if o == default else o for o in _options(group))
        lines.append(f"  {group}: {options}")
    lines += ["", f"keys of {config_name}.yaml:", *_own_keys(CONF_DIR / f"{config_name}.yaml")]
    lines += [
        "",
        f"Every key with its value: {script} [overrides] --cfg job",
        "Change a key of a group: data.batch_size=32; add one it lacks: +key=value.",
        f"Hydra's own options (multirun -m, --cfg, ...): {script} --hydra-help",
    ]
    return "\n".join(lines)


def _defaults(path: Path) -> list[Any]:
    return (yaml.safe_load(path.read_text()) or {}).get("defaults", [])


def _groups_used(config_name: str) -> list[tuple[str, str | None]]:
    """(group, default option) for each group in the config's defaults list and the groups
    their options pull in (model -> model/encoder, model/decoder)."""
    found: dict[str, str | None] = {}
    for entry in _defaults(CONF_DIR / f"{config_name}.yaml"):
        if not isinstance(entry, dict):
            continue
        ((group, default),) = entry.items()
        if group in HIDDEN_GROUPS:
            continue
        found[group] = default
        for option in _options(group):
            for sub in _defaults(CONF_DIR / group / f"{option}.yaml"):
                name, value = next(iter(sub.items())) if isinstance(sub, dict) else ("", None)
                name = f"{group}/{name.removeprefix('override ').strip()}"
                if name != f"{group}/" and (CONF_DIR / name).is_dir():
                    found[name] = value if option == default else found.get(name)
    return list(found.items())


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _own_keys(path: Path) -> list[str]:
    """The config file's lines after its defaults list: its keys, each with its comment."""
    lines = path.read_text().splitlines()
    body, in_defaults = [], False
    for line in lines:
        if line.startswith("defaults:"):
            in_defaults = True
            continue
        if in_defaults and (line.startswith((" ", "-")) or not line.strip()):
            continue
        in_defaults = False
        if line.strip() and not line.startswith("#"):
            body.append("  " + line)
    return body


# --- checking the overrides ------------------------------------------------------------------


def check_overrides(config_name: str, overrides: Sequence[str]) -> None:
    """Compose the config as Hydra will; raise a one-line `ConfigError` naming the fix if it
    cannot be. A sweep (`-m seed=1,2`) is checked with its first value."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise ConfigError(first_line(err) + " (quote values holding '=' or spaces)") from None
    singles = []
    for override in parsed:
        values = [override.input_line.partition("=")[2]]
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())
        singles.append(
            f"{override.get_key_element()}={values[0]}" if values[0] else override.input_line
        )
        if override.key_or_group in _all_groups() and not override.is_delete():
            for value in values:
                _check_option(override.key_or_group, value)
    try:
        compose(config_name, singles, hydra_config=True)
    except MissingConfigException as err:
        raise ConfigError(first_line(err)) from None
    except (HydraException, ValueError) as err:
        unset = re.search(r"You must specify '([\w/]+)'", str(err))
        if unset:
            group = unset.group(1)
            raise ConfigError(
                f"{config_name}.py needs {group}=NAME (options: {', '.join(_options(group))})"
            ) from None
        named = re.search(r"'([^']+)'", str(err))  # "Could not override 'data.x'" and the like
        key = named.group(1) if named else None
        failed = next((o for o in parsed if o.key_or_group == key), None)
        if failed is None:
            raise ConfigError(first_line(err)) from None
        rest = [s for s, o in zip(singles, parsed, strict=True) if o is not failed]
        raise ConfigError(_explain(config_name, failed, rest, err)) from None


def _all_groups() -> set[str]:
    return {str(p.relative_to(CONF_DIR)) for p in CONF_DIR.rglob("*") if p.is_dir()}


def _check_option(group: str, option: str) -> None:
    """`option` is one of the group's configs, ours or a Hydra plugin's (hydra/launcher=...)."""
    with initialized() as hydra:
        options = hydra.config_loader().get_group_options(group)
    if option in options or option == "null":
        return
    close = difflib.get_close_matches(option, options, n=1)
    guess = f"did you mean {group}={close[0]}? " if close else ""
    raise ConfigError(f"{group}={option}: no such option; {guess}(options: {', '.join(options)})")


def _explain(config_name: str, failed: Any, rest: list[str], err: Exception) -> str:
    """Why `failed` did not apply, and what to type instead."""
    key = failed.key_or_group
    line = failed.input_line
    if failed.is_add():
        return f"{line}: {key} already exists: drop the '+' ({line.lstrip('+')})."
    try:
        cfg = compose(config_name, rest, hydra_config=True)
    except HydraException:
        return first_line(err)
    parts = key.split(".")
    node: Any = cfg
    depth = 0
    while depth < len(parts) - 1 and parts[depth] in _keys(node):
        node, depth = node[parts[depth]], depth + 1
    where = ".".join(parts[:depth])
    if depth == 0 and len(parts) > 1 and (CONF_DIR / parts[0]).is_dir():
        node, where = None, parts[0]  # a group left out (`data: null`): no node at all
    if node is None:
        hint = f"{where} is null here: choose one first ({where}=NAME)"
        if config_name == "eval" and where == "data":
            hint += f", or change the checkpoint's own data config with +{line.lstrip('~+')}"
        return f"{line}: {hint}."
    parent, leaf = parts[:depth], parts[depth]
    verb = "deleted" if failed.is_delete() else "set"
    message = f"{line}: {key} is not a key that can be {verb} here"
    group = _group_of(cfg, parts)
    if group is not None:
        message = f"{line}: {key} is not a key of {group}={cfg.hydra.runtime.choices[group]}"
    close = difflib.get_close_matches(leaf, _keys(node), n=1)
    if close:
        return f"{message}; did you mean {'.'.join([*parent, close[0]])}?"
    if group is not None:
        elsewhere = _keys_elsewhere(config_name, group, ".".join(parent), rest)
        having = [option for option, keys in elsewhere.items() if leaf in keys]
        if having:
            choices = " or ".join(f"{group}={o}" for o in having)
            return f"{message}; {choices} has it: add {group}={having[0]} to the command line."
        close = difflib.get_close_matches(leaf, {k for keys in elsewhere.values() for k in keys}, 1)
        if close:
            having = [option for option, keys in elsewhere.items() if close[0] in keys]
            fixed = ".".join([*parent, close[0]])
            return f"{message}; did you mean {fixed} (a key of {group}={' or '.join(having)})?"
    return f"{message}; see the keys with: {invocation(config_name)} --cfg job"


def _keys(node: Any) -> list[str]:
    """A node's keys, those still `???` included."""
    return [str(k) for k in node] if isinstance(node, DictConfig) else []


def _group_of(cfg: DictConfig, parts: list[str]) -> str | None:
    """The deepest config group the key belongs to (model.encoder.dim -> model/encoder)."""
    choices = cfg.hydra.runtime.choices
    for n in range(len(parts) - 1, 0, -1):
        group = "/".join(parts[:n])
        if choices.get(group) is not None and (CONF_DIR / group).is_dir():
            return group
    return None


def _keys_elsewhere(
    config_name: str, group: str, path: str, rest: list[str]
) -> dict[str, list[str]]:
    """For each option of `group`, the keys its config has at `path`."""
    found = {}
    others = [r for r in rest if not r.lstrip("~+").startswith(f"{group}=")]
    for option in _options(group):
        try:
            cfg = compose(config_name, [*others, f"{group}={option}"], hydra_config=True)
        except HydraException:
            continue
        found[option] = _keys(OmegaConf.select(cfg, path))
    return found
