"""`sftcurate select METHOD` on plain files: the command of each registered selector, derived from the registry
(its name, its line of help, an option per field of its typed params and one per requirement a file can
supply), and the run on files they share. A new selector gets its subcommand from its own module."""
from __future__ import annotations

import inspect
import json
import types
import typing
from pathlib import Path
from typing import Callable, List, Literal, Optional

import numpy as np
import pyarrow as pa
import typer
import yaml

from sftcurate.core.ingest import load_pool
from sftcurate.core.requirements import declared, requirement
from sftcurate.core.selection import selection_table
from sftcurate.core.selectors.base import (REGISTRY, Budget, Selector, SelectorInputs, SelectorParamError,
                                           get_selector, parse_params, selector_class, selector_help)
from sftcurate.core.target import TARGETS
from sftcurate.data_contracts import SELECTION, UserError
from sftcurate.infra.store import write_table

# options every subcommand has; a selector parameter of the same name is set with --param NAME=VALUE
COMMON_OPTIONS = ("budget", "token_budget", "out", "examples", "seed", "param", "json")


def _placeholder_pool(n: int, ids: list[str] | None = None, sources: list[str] | None = None) -> pa.Table:
    return pa.table({"id": ids or [str(i) for i in range(n)], "source": sources or [""] * n})


def parse_param_items(items: list[str]) -> dict:
    """`--param key=value` items as a dict (values read as YAML: numbers, booleans, lists)."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SelectorParamError(f"--param {item}: expected key=value, e.g. --param epsilon=0.2")
        params[key] = yaml.safe_load(value) if value else value
    return params


def select_from_files(method: str, budget: int | None, token_budget: int | None, seed: int, params: dict,
                      out_path: str, files: dict[str, str] | None = None, examples: str | None = None) -> dict:
    """Run `method` on the inputs named by `files` (requirement option -> file or value, as the requirements'
    `from_file` declare) and on the pool of `examples` when given; write the selection manifest to `out_path`."""
    cls = selector_class(method)
    selector = get_selector(method, parse_params(method, cls.Params, params, where="--param"))
    files = files or {}
    # a selector that aims at a target optionally (s2l, fishersft) reads it when its file is given
    requires = cls.requirements(target=any(files.get(_target_option(name)) for name in TARGETS))
    pool, counts = None, None
    inputs = SelectorInputs(pool=pa.table({"id": pa.array([], pa.string())}), token_counts=np.zeros(0, np.int64))
    if examples:
        pool = load_pool(examples)
        counts = np.asarray(pool.column("response_tokens"), dtype=np.int64)
    for needed in declared(requires):
        source = needed.from_file
        if source is None:
            raise UserError(f"selector '{method}' needs '{needed.name}', which `sftcurate select` cannot read from "
                            "a file; run it through `sftcurate run`")
        if not files.get(source.option) or (source.needs_examples and not examples):
            more = " and --examples URI" if source.needs_examples else ""
            raise UserError(f"selector '{method}' needs --{source.option} ({source.help}){more}")
        ids, file_counts = source.read(files[source.option], inputs)
        if pool is None and ids is not None:
            pool = _placeholder_pool(len(ids), ids)
        counts = file_counts if counts is None else counts
    if counts is None:
        given = ", ".join(f"--{r.from_file.option}" for r in declared(requires) if r.from_file)
        raise UserError(f"selector '{method}': pass {given + ' or ' if given else ''}--examples to define the pool")
    if pool is None:
        pool = _placeholder_pool(len(counts))
    if pool.num_rows != len(counts):
        raise UserError(f"the pool has {pool.num_rows} examples but the inputs describe {len(counts)}")
    inputs.pool, inputs.token_counts = pool, counts
    budget_obj = Budget(budget, token_budget)
    budget_obj.check(inputs.size, int(counts.sum()))
    result = selector.select(inputs, budget_obj, seed)
    table = selection_table(result, pool, counts)
    meta = {"method": method, "budget": budget, "token_budget": token_budget, "seed": seed,
            "params": selector.params.model_dump(mode="json"), "pool_size": inputs.size, "selected": table.num_rows,
            "selected_tokens": int(np.asarray(table.column("tokens")).sum()) if table.num_rows else 0,
            "objective": result.objective}
    table = table.replace_schema_metadata({b"sftcurate.selection": json.dumps(meta, default=str).encode()})
    write_table(out_path, table, SELECTION)
    return {**meta, "out": out_path}


# ---------------------------------------------------------------- the subcommands, from the registry

def _option_type(annotation) -> tuple[type | None, str]:
    """The command-line type of a params field (None: only through --param) and the choices it allows."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is Literal:
        return str, " (" + " | ".join(map(str, typing.get_args(annotation))) + ")"
    return (annotation, "") if annotation in (bool, int, float, str) else (None, "")


def _params_options(cls: type[Selector]) -> dict[str, inspect.Parameter]:
    options = {}
    for field_name, info in cls.Params.model_fields.items():
        kind, choices = _option_type(info.annotation)
        if kind is None or field_name in COMMON_OPTIONS:
            continue
        flag = "--" + field_name.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
        help_text = f"{info.description or field_name}{choices} (default: {info.default})"
        options[f"param_{field_name}"] = inspect.Parameter(
            f"param_{field_name}", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],
            default=typer.Option(None, *decls, help=help_text, show_default=False))
    return options


def _file_param(option: str) -> str:
    """The Python name of a file option (`--target-features` -> file_target_features)."""
    return "file_" + option.replace("-", "_")


def _target_option(name: str) -> str | None:
    """The command-line option of target requirement `name` (`--target-features`, `--target-trajectories`)."""
    source = requirement(name).from_file
    return source.option if source is not None else None


def _file_options(cls: type[Selector]) -> dict[str, inspect.Parameter]:
    options = {}
    for needed in declared(cls.requirements(target=True)):  # a target's options too, where it is optional
        if needed.from_file is not None and needed.from_file.option not in COMMON_OPTIONS:
            name = _file_param(needed.from_file.option)
            options[name] = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                              default=typer.Option(None, f"--{needed.from_file.option}",
                                                                   help=needed.from_file.help))
    return options


def selector_command(method: str, cls: type[Selector], run: Callable, json_help: str) -> Callable:
    """The `sftcurate select METHOD` command: its options come from the selector's params and requirements."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    common = [
        inspect.Parameter("budget", keyword, annotation=Optional[int],
                          default=typer.Option(None, "--budget", help="number of examples to keep")),
        inspect.Parameter("token_budget", keyword, annotation=Optional[int],
                          default=typer.Option(None, "--token-budget", help="number of loss tokens to keep")),
        inspect.Parameter("out_path", keyword, annotation=Path,
                          default=typer.Option(..., "--out", help="selection manifest to write (.parquet)")),
        inspect.Parameter("examples", keyword, annotation=Optional[str],
                          default=typer.Option(None, "--examples", help="committed examples artifact URI (the pool)")),
    ]
    tail = [
        inspect.Parameter("seed", keyword, annotation=int,
                          default=typer.Option(0, "--seed", help="seed of every random choice")),
        inspect.Parameter("param", keyword, annotation=List[str],
                          default=typer.Option([], "--param", help="a selector parameter as key=value (any of "
                                               + (", ".join(cls.Params.model_fields) or "none") + ")")),
        inspect.Parameter("json_out", keyword, annotation=Optional[str],
                          default=typer.Option(None, "--json", help=json_help)),
    ]
    files, params = _file_options(cls), _params_options(cls)
    file_options = {r.from_file.option for r in declared(cls.requirements(target=True))
                    if r.from_file is not None} - set(COMMON_OPTIONS)

    def command(**values) -> None:
        chosen = {name[len("param_"):]: values[name] for name in params if values[name] is not None}

        def job() -> dict:
            return select_from_files(
                method, values["budget"], values["token_budget"], values["seed"],
                {**chosen, **parse_param_items(values["param"])}, str(values["out_path"]),
                files={option: values[_file_param(option)] for option in file_options if values[_file_param(option)]},
                examples=values["examples"])

        run(method, job, values["json_out"])

    parameters = [*common, *files.values(), *params.values(), *tail]
    command.__signature__ = inspect.Signature(parameters)
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__doc__ = selector_help(cls)
    return command


def selector_click_command(method: str, run: Callable, json_help: str):
    """The click command of registered selector `method` (None when there is none by that name)."""
    cls = REGISTRY.get(method)
    if cls is None:
        return None
    one = typer.Typer(add_completion=False)
    one.command(method, help=selector_help(cls))(selector_command(method, cls, run, json_help))
    return typer.main.get_command(one)
