"""The configuration reference page, rendered from the settings class so that it cannot drift.

``python -m dagster_taskiq_cancel.reference > docs/configuration.md`` rewrites the page; a test
fails when the committed page differs from ``render()``.
"""

from __future__ import annotations

import types
from typing import Any, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from dagster_taskiq_cancel.settings import SECRET_FIELDS, TaskiqCancelSettings

PAGE = "docs/configuration.md"
REGENERATE = f"python -m dagster_taskiq_cancel.reference > {PAGE}"
TYPE_NAMES = {str: "text", int: "integer", float: "number", bool: "true/false"}
# The bounds pydantic keeps in a field's metadata, by the attribute that holds each number.
BOUNDS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}

INTRO = """\
---
title: Configuration reference
description: Every setting of dagster-taskiq-cancel, its environment variable, type and default.
---

# Configuration reference

<!-- Generated from dagster_taskiq_cancel/settings.py: do not edit by hand.
     Regenerate with `{regenerate}`. -->

One settings class, `TaskiqCancelSettings`, holds every option. The run launcher's config in
`dagster.yaml`, `TaskiqCancelResource`, `taskiq_executor`, the components and the command-line
options are all built from it, and each setting can also come from its environment variable.

Every entry point (launcher, executor, resource, sensor, `worker`, `queues`, `cancel`) resolves a
setting in this order:

1. given explicitly: a command-line option, a `TaskiqCancelResource(...)` or executor field;
2. the `TaskiqRunLauncher` config in the `dagster.yaml` of the instance, when the instance uses
   that launcher (for the CLI and scripts: the instance `DAGSTER_HOME` names);
3. the `DAGSTER_TASKIQ_*` environment variable;
4. the default below.

A wrong value stops a command, or fails a code location's load, with one line naming the
setting, the value given and where to set it. Secret settings ({secrets}) are never accepted in
run config or component YAML, which Dagster stores and shows: give them in the environment.

| setting | environment variable | type | default | description |
|---|---|---|---|---|
"""


def type_text(field: FieldInfo) -> str:
    """The field's type in words, with its bounds: ``integer, ≥ 1, ≤ 20``."""
    annotation: Any = field.annotation
    optional = False
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        optional = len(args) < len(get_args(annotation))
        annotation = args[0]
    words = [TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))]
    for meta in field.metadata:
        words += [
            f"{sign} {getattr(meta, attr)}" for attr, sign in BOUNDS.items() if hasattr(meta, attr)
        ]
    if optional:
        words.append("optional")
    return ", ".join(words)


def default_text(field: FieldInfo) -> str:
    return "none" if field.default is None else f"`{field.default}`"


def cell(text: str) -> str:
    """Text made safe for one cell of a Markdown table."""
    return " ".join(text.split()).replace("|", "\\|")


def render() -> str:
    """The whole reference page."""
    secrets = ", ".join(f"`{name}`" for name in sorted(SECRET_FIELDS))
    lines = [INTRO.format(regenerate=REGENERATE, secrets=secrets)]
    for name, field in TaskiqCancelSettings.model_fields.items():
        lines.append(
            f"| `{name}` | `{TaskiqCancelSettings.env_var(name)}` | {type_text(field)} "
            f"| {default_text(field)} | {cell(field.description or '')} |\n"
        )
    return "".join(lines)


if __name__ == "__main__":
    print(render(), end="")
