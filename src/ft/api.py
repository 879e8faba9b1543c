"""The API for plugin authors: everything a plugin needs from ft, in one module.

First-party plugins import from here (and from ``ft`` itself for ``hookimpl``) and nothing else
of ft; a test checks it. Names are imported lazily, so ``import ft.api`` stays light (no torch,
no transformers): the module that defines a name is imported when the name is first used.

Groups:

- hooks: ``hookimpl``, ``hookspec``
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
  shared by methods: ``ft.scoring``); model heads ``CAUSAL_LM``,
  ``AUTO_CLASSES`` (head -> transformers class name), ``SEQUENCE_CLASSIFICATION``, ``TOKEN_CLASSIFICATION`` and
  ``model_head(cfg)`` (the chosen method's head and ``num_labels``, for loaders and adapters)
- collating: ``pad_rows``, ``PaddingCollator``, ``gather_ranges``
- training: ``resolve_precision``, ``torch_dtype``, ``torch_dtype_named``, ``close_progress_bars``,
  ``last_good_checkpoint``
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
    "FtError": "ft.errors", "ConfigError": "ft.errors", "DataError": "ft.errors", "PluginError": "ft.errors",
    "MissingDependencyError": "ft.errors", "is_installed": "ft.errors", "load_or_explain": "ft.errors",
    "defined_at": "ft.errors",
    # config
    "Config": "ft.config", "resolve_path": "ft.context", "NOT_TRAINING": "ft.config",
    "SHAPES_DATA": "ft.config", "redact_text": "ft.config",
    "read_yaml": "ft.config", "reporter_names": "ft.config",
    # data sources
    "RawRows": "ft.data", "RowPart": "ft.data", "Drop": "ft.formats", "MALFORMED": "ft.data",
    "file_digest": "ft.cache",
    # prepared data
    "record_cache_file": "ft.cache", "cache_file_problem": "ft.cache",
    # formats
    "DatasetOptions": "ft.formats", "Dropped": "ft.formats", "Note": "ft.formats", "Tokenize": "ft.formats",
    "IGNORE_INDEX": "ft.formats", "TextEncoder": "ft.formats", "entry_where": "ft.formats",
    "PromptCompletion": "ft.formats",
    # methods
    "Method": "ft.methods", "SFT_COLUMNS": "ft.methods", "PACKING": "ft.methods", "EVAL": "ft.methods",
    "MODEL_LOSS": "ft.methods",
    "LOSS_WATCH": "ft.methods", "CAUSAL_LM": "ft.methods", "SEQUENCE_CLASSIFICATION": "ft.methods",
    "TOKEN_CLASSIFICATION": "ft.methods", "model_head": "ft.methods",
    "AUTO_CLASSES": "ft.methods",
    "ReferenceModel": "ft.scoring", "token_logps": "ft.scoring", "sequence_logps": "ft.scoring",
    "has_adapter": "ft.scoring", "target_logps": "ft.scoring", "output_layer": "ft.scoring",
    "accumulation_share": "ft.scoring",
    # collating
    "pad_rows": "ft.collate", "PaddingCollator": "ft.collate", "gather_ranges": "ft.data_tokenize",
    # training
    "resolve_precision": "ft.train", "torch_dtype": "ft.train", "torch_dtype_named": "ft.train",
    "close_progress_bars": "ft.train", "last_good_checkpoint": "ft.checkpoints",
    # commands
    "handle_errors": "ft.cli", "setup_logging": "ft.cli", "make_plugin_manager": "ft.context",
    "collect_registries": "ft.context",
    # kernels
    "PatchRecord": "ft.patching", "patch_attribute": "ft.patching",
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
