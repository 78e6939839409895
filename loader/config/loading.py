"""Reading pipeline.yaml: safe YAML with an alias cap, ${NAME} interpolation, validation."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from collections.abc import Mapping as _Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)


from ..errors import ConfigError
from .base import Loc, ModelT, Problem, _dotted, _problems_from
from .models import Pipeline

# A real pipeline.yaml has a few hundred values; this leaves ample room while
# refusing alias bombs long before they cost memory or time.
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 100



# --------------------------------------------------------------------------
# YAML, interpolation, entry points
# --------------------------------------------------------------------------

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_nodes(root: yaml.Node) -> list[Problem]:
    """Refuse alias bombs and cycles; report duplicate keys.

    Sizes are memoized per node, so a billion-laughs document costs as much
    as its text, not its expansion.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError("the file uses a recursive YAML alias (an anchor inside itself)")
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"the file nests values deeper than {MAX_YAML_DEPTH} levels")
        active.add(key)
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        total = 1 + sum(size(child, depth + 1) for child in children)
        active.discard(key)
        sizes[key] = total
        if total > MAX_YAML_NODES:
            # Every node below this one is in `sizes`; fewer of them than
            # `total` means aliases repeat them.
            if len(sizes) < total:
                raise ConfigError(
                    "the file uses too many YAML aliases: they would expand to more "
                    f"than {MAX_YAML_NODES} values"
                )
            raise ConfigError(f"the file is too large (more than {MAX_YAML_NODES} values)")
        return total

    size(root, 0)

    # Bounded by MAX_YAML_NODES now, so walking the expansion is cheap.
    problems: list[Problem] = []

    def duplicates(node: yaml.Node, loc: Loc) -> None:
        if isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    continue
                name = key_node.value
                if name in first_line:
                    problems.append(
                        (loc + (name,), f"duplicate key (first on line {first_line[name]})")
                    )
                else:
                    first_line[name] = key_node.start_mark.line + 1
                duplicates(value_node, loc + (name,))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                duplicates(item, loc + (index,))

    duplicates(root, ())
    return problems


def _load_yaml(text: str) -> tuple[Any, list[Problem]]:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        problems = _check_nodes(node)
        return loader.construct_document(node), problems
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem and exc.problem.startswith("but "):
            what = f"{exc.context}, {exc.problem}"  # "expected ..., but found ..."
        raise ConfigError(f"invalid YAML{where}: {what}") from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise ConfigError(
            f"invalid YAML at line {line}, column {column}: character #x{code:04x} "
            f"is not allowed ({exc.reason})"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()


_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _interpolate(
    data: Any, lookup: _Mapping[str, str], environ: _Mapping[str, str], loc: Loc,
    problems: list[Problem],
) -> Any:
    # Builds new containers: YAML aliases share objects, and substituting in
    # place would process a shared string twice (turning `$${` into `${`).
    if isinstance(data, dict):
        return {k: _interpolate(v, lookup, environ, loc + (k,), problems) for k, v in data.items()}
    if isinstance(data, list):
        return [_interpolate(v, lookup, environ, loc + (i,), problems) for i, v in enumerate(data)]
    if not isinstance(data, str) or "${" not in data:
        return data

    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "$${":
            return "${"
        name = match.group(1)
        if name is None:
            problems.append((loc, "unclosed ${; write $${ for a literal ${"))
            return token
        if not _VAR_NAME.fullmatch(name):
            problems.append(
                (loc, f"{token} is not a valid reference: use ${{NAME}} with letters, digits "
                      "and _, or $${ for a literal ${")
            )
            return token
        if name in lookup:
            return str(lookup[name])
        if name in environ:
            return str(environ[name])
        problems.append(
            (loc, f"${{{name}}} is not set; pass --var {name}=... or set the environment variable")
        )
        return token

    return _REFERENCE.sub(replace, data)


def _within(loc: Loc, prefixes: set[Loc]) -> bool:
    return any(loc[: len(prefix)] == prefix for prefix in prefixes)


def _parse(
    text: str,
    *,
    base_dir: Path,
    vars: _Mapping[str, str] | None,
    environ: _Mapping[str, str] | None,
    file: str | None,
    path: Path | None,
) -> Pipeline:
    try:
        data, problems = _load_yaml(text)
    except ConfigError as exc:
        raise ConfigError(exc.problems, file=file) from None
    if data is None:
        raise ConfigError("the file is empty; a pipeline needs version, name, source and mapping",
                          file=file)
    if not isinstance(data, dict):
        raise ConfigError(
            f"the top level must be a mapping (version: 1, name: ..., source: ...), "
            f"not a {'list' if isinstance(data, list) else 'single value'}",
            file=file,
        )
    interpolation: list[Problem] = []
    data = _interpolate(data, vars or {}, os.environ if environ is None else environ, (),
                        interpolation)
    problems += interpolation
    context = {"base_dir": Path(base_dir).resolve(), "path": path}
    try:
        pipeline = Pipeline.model_validate(data, context=context)
    except ValidationError as exc:
        # An unresolved ${NAME} already explains whatever its key gets wrong.
        unresolved = {loc for loc, _ in interpolation}
        problems += [p for p in _problems_from(exc, Pipeline) if not _within(p[0], unresolved)]
        pipeline = None
    if problems:
        unique = list(dict.fromkeys((_dotted(loc), msg) for loc, msg in problems))
        raise ConfigError(unique, file=file) from None
    assert pipeline is not None
    return pipeline


def parse_pipeline(
    text: str,
    *,
    base_dir: Path,
    vars: _Mapping[str, str] | None = None,
    environ: _Mapping[str, str] | None = None,
    file: str | None = None,
) -> Pipeline:
    """Parse pipeline.yaml text; relative paths resolve against `base_dir`.

    `${NAME}` takes `vars[NAME]`, else `environ[NAME]` (default `os.environ`).
    `file` names the text in error messages. Raises `ConfigError`.
    """
    return _parse(text, base_dir=base_dir, vars=vars, environ=environ, file=file, path=None)


def load_pipeline(
    path: str | os.PathLike[str],
    vars: _Mapping[str, str] | None = None,
    *,
    environ: _Mapping[str, str] | None = None,
) -> Pipeline:
    """Read and validate a pipeline.yaml; relative paths in it resolve
    against the file's folder. Raises `ConfigError` (exit code 2)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(file)) from None
    except UnicodeDecodeError:
        raise ConfigError("the file is not UTF-8 text", file=str(file)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", file=str(file)) from None
    return _parse(text, base_dir=file.parent, vars=vars, environ=environ, file=str(file),
                  path=file.resolve())


def parse_section(
    model: type[ModelT], data: Any, section: str, *, base_dir: Path | None = None
) -> ModelT:
    """Validate a dict (a notebook's `mapping`, `target`, ...) into `model`,
    with the same key-path errors as pipeline.yaml (`section` prefixes them).
    Relative paths resolve against `base_dir`, else the current directory."""
    context = {"base_dir": Path(base_dir).resolve() if base_dir is not None else Path.cwd()}
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        prefix: Loc = tuple(section.split(".")) if section else ()
        problems = [(_dotted(prefix + loc), msg) for loc, msg in _problems_from(exc, model)]
        raise ConfigError(list(dict.fromkeys(problems))) from None


def parse_var_assignments(items: Iterable[str]) -> dict[str, str]:
    """`["K=V", ...]` (from `--var`) -> `{"K": "V"}`; a later K wins."""
    assignments: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for position, item in enumerate(items, start=1):
        name, equals, value = item.partition("=")
        if not equals:
            # Never echo it: it may be a secret pasted without its name.
            problems.append(("--var", f"expected NAME=VALUE, but --var number {position} has no '='"))
        elif not _VAR_NAME.fullmatch(name):
            problems.append(("--var", f"'{name}' is not a variable name (letters, digits and _)"))
        else:
            assignments[name] = value
    if problems:
        raise ConfigError(problems)
    return assignments

