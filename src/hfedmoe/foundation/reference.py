"""docs/CONFIG.md, generated from the typed config's own fields and descriptions, so the
reference cannot drift from the code (``tests/test_config_reference.py`` fails when the page is
stale or a field has no description).

    .venv/bin/python -m hfedmoe.foundation.reference > docs/CONFIG.md
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from hfedmoe.foundation.config import ExperimentConfig

HEADER = """# Configuration reference

Every key of an experiment's TOML file, section by section, with its type, its default and
what it does. Generated from the typed config (`src/hfedmoe/foundation/config.py`) by
`.venv/bin/python -m hfedmoe.foundation.reference > docs/CONFIG.md`; a test fails when this
page and the code disagree. Any key can also be set on the command line:
`--set section.key=value` (TOML syntax for the value).
"""


def _section_of(annotation: object) -> type[BaseModel] | None:
    """The config section a field holds (itself, or the items of a list of sections)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _type(annotation: object) -> str:
    """A field's type as a reader writes it in TOML."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation) or (object,)
        return f"list of {_type(item)}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return "null" if value is None else f"`{json.dumps(value)}`"


def _rows(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, str, str, str]]:
    for name, field in model.model_fields.items():
        if _section_of(field.annotation) is None:
            text = " ".join((field.description or "").split()).replace("|", "\\|")
            yield f"`{prefix}{name}`", _type(field.annotation), _default(field), text


def _sections(
    model: type[BaseModel], path: str
) -> Iterator[tuple[str, type[BaseModel], str | None]]:
    """(TOML header, section, its description) of ``model`` and every section below it."""
    yield path, model, model.__doc__
    for name, field in model.model_fields.items():
        section = _section_of(field.annotation)
        if section is not None:
            is_list = typing.get_origin(field.annotation) is list
            header = f"{path}.{name}" if path else name
            yield from _sections(section, f"[{header}]" if is_list else header)


def config_reference() -> str:
    """The whole page."""
    lines = [HEADER]
    for path, model, doc in _sections(ExperimentConfig, ""):
        rows = list(_rows(model, ""))
        if not rows:
            continue
        title = "top level" if not path else f"[{path}]"
        summary = " ".join((doc or "").split())
        lines += [f"## {title}", "", summary, "", "| key | type | default | what it does |"]
        lines.append("| --- | --- | --- | --- |")
        lines += [f"| {k} | {t} | {d} | {text} |" for k, t, d, text in rows]
        lines.append("")
    return "\n".join(lines)


def undescribed() -> list[str]:
    """Every field without a description, by its dotted key."""
    missing = []
    for path, model, _ in _sections(ExperimentConfig, ""):
        for name, field in model.model_fields.items():
            if _section_of(field.annotation) is None and not field.description:
                missing.append(f"{path.strip('[]')}.{name}".lstrip("."))
    return missing


if __name__ == "__main__":
    print(config_reference(), end="")
