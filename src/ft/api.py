"""The API for plugin authors: everything a plugin needs from ft, in one module.

First-party plugins import from here (and from ``ft`` itself for ``hookimpl``) and nothing else
of ft; a test checks it. Names are imported lazily, so ``import ft.api`` stays light (no torch,
no transformers): the module that defines a name is imported when the name is first used.

Groups:

- hooks: ``hookimpl``, ``hookspec``
- the plugin's declaration: ``Plugin`` (``PLUGIN = Plugin(feature=True, provides=[...], ...)`` in its module)
- errors: ``FtError``, ``ConfigError``, ``DataError``, ``PluginError``, ``MissingDependencyError``,
  ``is_installed``, ``load_or_explain``, ``defined_at`` (``function NAME at FILE:LINE``, for messages)
- config: ``Config`` (the type hooks receive), ``resolve_path``, ``NOT_TRAINING`` (``json_schema_extra`` of a
  section model or field whose values do not change what training computes, so a resumed run may change them), ``SHAPES_DATA`` (``json_schema_extra`` of a method-section field whose value
  changes the prepared rows: only such fields enter the prepared-data cache key),
  ``redact_text`` (a message or label with the credentials of any URL in it replaced), ``read_yaml`` (a YAML file
  with the line of every key), ``reporter_names`` (the ``report_to`` values in force)
- data sources: ``RawRows``, ``RowPart``, ``Drop``, ``MALFORMED``, ``file_digest``
- prepared data: ``record_cache_file`` (list a file a run adds to the prepared data's directory in its checksummed
  manifest), ``cache_file_problem`` (what is wrong with such a file: None when its checksum matches)
- formats: ``DatasetOptions``, ``Dropped``, ``Note``, ``Tokenize``, ``IGNORE_INDEX``, ``TextEncoder``,
  ``entry_where``, ``PromptCompletion`` (the base of prompt/completion formats)
- methods: ``Method``, ``SFT_COLUMNS``, ``PACKING``, ``EVAL``, ``MODEL_LOSS``, ``LOSS_WATCH``, ``ReferenceModel``, ``token_logps``,
  ``sequence_logps``, ``target_logps``, ``output_layer``, ``has_adapter``, ``accumulation_share`` (the scoring
  shared by methods: ``ft.engine.scoring``); model heads ``CAUSAL_LM``,
  ``AUTO_CLASSES`` (head -> transformers class name), ``SEQUENCE_CLASSIFICATION``, ``TOKEN_CLASSIFICATION`` and
  ``model_head(cfg)`` (the chosen method's head and ``num_labels``, for loaders and adapters),
  ``config_head`` / ``architecture_head`` (the head a saved model's config or a class name says it has)
- collating: ``pad_rows``, ``PaddingCollator``, ``gather_ranges``, ``is_token_column`` (a column of token ids,
  one per token; ``positions=True``: ``position_ids`` too)
- training: ``resolve_precision``, ``torch_dtype``, ``torch_dtype_named``, ``close_progress_bars``,
  ``last_good_checkpoint``, ``is_main_process`` (global rank 0, or no launcher: the process that writes files)
- kernels: ``PatchRecord``, ``patch_attribute``
- commands (``ft_add_commands``): ``handle_errors`` (ft's error display for a click command),
  ``setup_logging``, ``make_plugin_manager`` (the installed plugins, for commands that call hooks),
  ``collect_registries`` (what they register)
"""

from __future__ import annotations

import importlib
from typing import Any

from ft import hookimpl, hookspec

_WHERE = {
    # errors
    "FtError": "ft.kernel.errors", "ConfigError": "ft.kernel.errors", "DataError": "ft.kernel.errors", "PluginError": "ft.kernel.errors",
    "MissingDependencyError": "ft.kernel.errors", "is_installed": "ft.kernel.errors", "load_or_explain": "ft.engine.failures",
    "defined_at": "ft.kernel.errors",
    # config
    "Config": "ft.kernel.config", "resolve_path": "ft.kernel.context", "NOT_TRAINING": "ft.kernel.config",
    "SHAPES_DATA": "ft.kernel.config", "redact_text": "ft.kernel.redact",
    "read_yaml": "ft.kernel.config_file", "reporter_names": "ft.kernel.config_checks",
    # data sources
    "RawRows": "ft.engine.data", "RowPart": "ft.engine.data", "Drop": "ft.kernel.formats", "MALFORMED": "ft.engine.data",
    "file_digest": "ft.engine.cache",
    # prepared data
    "record_cache_file": "ft.engine.cache", "cache_file_problem": "ft.engine.cache",
    # formats
    "DatasetOptions": "ft.kernel.formats", "Dropped": "ft.kernel.formats", "Note": "ft.kernel.formats", "Tokenize": "ft.kernel.formats",
    "IGNORE_INDEX": "ft.kernel.formats", "TextEncoder": "ft.engine.encoding", "entry_where": "ft.kernel.formats",
    "PromptCompletion": "ft.engine.encoding",
    # methods
    "Method": "ft.kernel.methods", "SFT_COLUMNS": "ft.kernel.methods", "PACKING": "ft.kernel.methods", "EVAL": "ft.kernel.methods",
    "MODEL_LOSS": "ft.kernel.methods",
    "LOSS_WATCH": "ft.kernel.methods", "CAUSAL_LM": "ft.kernel.methods", "SEQUENCE_CLASSIFICATION": "ft.kernel.methods",
    "TOKEN_CLASSIFICATION": "ft.kernel.methods", "model_head": "ft.kernel.methods",
    "AUTO_CLASSES": "ft.kernel.methods", "config_head": "ft.engine.outputs", "architecture_head": "ft.engine.outputs",
    "ReferenceModel": "ft.engine.scoring", "token_logps": "ft.engine.scoring", "sequence_logps": "ft.engine.scoring",
    "has_adapter": "ft.engine.scoring", "target_logps": "ft.engine.scoring", "output_layer": "ft.engine.scoring",
    "accumulation_share": "ft.engine.scoring",
    # collating
    "pad_rows": "ft.engine.collate", "PaddingCollator": "ft.engine.collate", "gather_ranges": "ft.engine.data_tokenize",
    "is_token_column": "ft.engine.columns",
    # training
    "resolve_precision": "ft.engine.arguments", "torch_dtype": "ft.engine.arguments", "torch_dtype_named": "ft.engine.arguments",
    "close_progress_bars": "ft.engine.train", "last_good_checkpoint": "ft.engine.checkpoints",
    "is_main_process": "ft.engine.launch",
    # commands
    "handle_errors": "ft.cli", "setup_logging": "ft.cli", "make_plugin_manager": "ft.kernel.context",
    "collect_registries": "ft.kernel.context",
    # plugins
    "Plugin": "ft.kernel.plugins",
    # kernels
    "PatchRecord": "ft.kernel.patching", "patch_attribute": "ft.kernel.patching",
}  # fmt: skip

__all__ = ["hookimpl", "hookspec", *_WHERE]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'ft.api' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
