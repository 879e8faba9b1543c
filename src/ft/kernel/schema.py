"""JSON Schema of the whole config: core keys, every first-party plugin's section, every format."""

from __future__ import annotations

import json
from collections.abc import Sequence

from ft.kernel.context import collect_registries, config_model, make_plugin_manager

SCHEMA_ID = "https://ft.dev/schemas/ft.schema.json"


def generate_schema(plugin_args: Sequence[str] = (), **pm_kwargs) -> str:
    """The schema as text, stable across runs (sorted keys, trailing newline)."""
    pm = make_plugin_manager(plugin_args, **pm_kwargs)
    model = config_model(collect_registries(pm))
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    schema["title"] = "ft config"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
