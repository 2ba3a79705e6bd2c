"""What the ``pvit`` command modules share (``flows/cli.py``, ``flows/commands.py``,
``flows/serve.py``): the stderr console and ``fail()``, ``--set``, and ``ConfigFlags``,
the flags that are aliases of experiment-file keys.

Bad input is one ``error: ...`` line: exit 2 for a bad config, argument or path, 1 for
bad data or a failed run.
"""

from __future__ import annotations

import inspect
import types
from pathlib import Path
from typing import Any, Callable, Literal, NoReturn, Optional, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.markup import escape
from typer.models import ArgumentInfo

from flows.experiment import ConfigError, ExperimentConfig, load_experiment

console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def load_or_exit(config: Optional[Path], overrides: dict[str, Any],
                 sets: Optional[list[str]] = None) -> ExperimentConfig:
    try:
        return load_experiment(config, overrides, sets)
    except ConfigError as exc:
        fail(str(exc))


# every command that reads the experiment file takes it; keys are the file's, dotted
# from the top (help texts are rich markup: escape() keeps "[depth, pose]")
SET_HELP = escape("override any key of the experiment file: section.key=value (repeatable; "
                  "the value is YAML, e.g. null, 1e-4, [depth, pose]; unknown keys are errors)")
SetOpt = typer.Option(None, "--set", help=SET_HELP, metavar="KEY=VALUE")


class ConfigFlags:
    """One command's flags, each an alias of one key of the experiment file.

    ``ConfigFlags({"frames": "generation.scene.frames"})`` is ``--frames N``, which does
    what ``--set generation.scene.frames=N`` does, except that ``--set`` is applied after
    it (and so wins). The option's type and help are the field's: its
    ``Field(description=...)``, then a ``Literal``'s choices; a ``bool`` field gives a
    flag that can only turn it on (``--overwrite``). A ``str`` field that holds a path
    is named with its type, ``("pretrain.out", Path)``, so the flag parses a path.

    ``add_options`` puts the options in a command's signature, where typer reads them;
    ``overrides`` turns the values typer passes back into the dotted keys that
    ``load_experiment`` applies. A flag not given (None) sets nothing.
    """

    def __init__(self, flags: dict[str, str | tuple[str, type]]):
        self.keys: dict[str, str] = {}
        self.parameters: list[inspect.Parameter] = []
        for name, entry in flags.items():
            key, parsed = (entry, None) if isinstance(entry, str) else entry
            self.keys[name] = key
            self.parameters.append(_option(name, key, _field(key), parsed))

    def add_options(self, command: Callable) -> Callable:
        """Decorator: the options replace ``command``'s ``**flags`` in the signature
        typer reads, listed after the command's arguments; typer then passes them to
        ``**flags`` by name."""
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                  for p in inspect.signature(command, eval_str=True).parameters.values()
                  if p.kind is not inspect.Parameter.VAR_KEYWORD]
        arguments = sum(isinstance(p.default, ArgumentInfo) for p in params)
        command.__signature__ = inspect.Signature(
            params[:arguments] + self.parameters + params[arguments:])
        return command

    def overrides(self, values: dict[str, Any]) -> dict[str, Any]:
        """The flags given, as {dotted key: value}; a path as the string the file
        would hold."""
        given = {}
        for name, key in self.keys.items():
            value = values[name]
            if value is not None and value is not False:   # False: a bool flag not given
                given[key] = str(value) if isinstance(value, Path) else value
        return given


def _field(key: str) -> FieldInfo:
    """The field of ``ExperimentConfig`` at a dotted key (``generation.scene.frames``)."""
    model: type[BaseModel] = ExperimentConfig
    *sections, leaf = key.split(".")
    try:
        for section in sections:
            model = _unwrap_optional(model.model_fields[section].annotation)
        return model.model_fields[leaf]
    except (KeyError, AttributeError):
        raise KeyError(f"{key}: not a key of the experiment file") from None


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = [a for a in get_args(annotation) if a is not type(None)]
    return annotation


def _option(name: str, key: str, field: FieldInfo, parsed: Optional[type]) -> inspect.Parameter:
    if not field.description:
        raise ValueError(f"{key} has a flag (--{name}) but no Field(description=...) for "
                         "its help")
    annotation = _unwrap_optional(field.annotation)
    help = field.description
    if get_origin(annotation) is Literal:
        # parsed as a plain string: a bad choice is then one `error:` line naming the
        # key (from the model's validation), like any bad value
        help += f" ({' | '.join(map(str, get_args(annotation)))})"
        annotation = str
    annotation = parsed or annotation
    decl = "--" + name.replace("_", "-")
    metavar = None
    if annotation is Path:
        # parsed as the text given: a Path would collapse file://HOST/p to file:/HOST/p
        # (and s3://b to s3:/b) before the location check the config value gets
        annotation, metavar = str, "PATH"
    if annotation is bool:
        option = typer.Option(False, decl, help=escape(help))
    else:
        option = typer.Option(None, decl, help=escape(help), metavar=metavar)
        annotation = Optional[annotation]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                             annotation=annotation)
