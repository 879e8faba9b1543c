"""Coming from axolotl: ``ft convert axolotl.yml -o ft.yaml``, and hints for axolotl keys in ft configs.

``ft convert`` translates an axolotl config into an ft config: ``adapter``/``lora_*`` become
``plugins: [lora]`` and a ``lora:`` section, ``load_in_4bit``/``load_in_8bit`` the ``qlora`` plugin,
``sample_packing`` the ``packing`` plugin, attention flags ``hf.attn_implementation``, ``liger_*``,
``fsdp``/``fsdp_config``, ``deepspeed`` and ``torch_compile`` their plugins, W&B and hub keys the
``wandb:`` and ``hub:`` sections, ``rl:`` a ``method:`` with its section (``rl: ebft`` with its ``ebft:``
block: ``method: ebft``), ``reward_model: true`` / ``process_reward_model: true`` the ``reward_model`` /
``prm`` methods (bradley_terry pairs as ``type: preference``), and datasets keep their
field mappings, roles, ``ds_type``, ``split`` and ``name``. The YAML it writes starts with a comment
for every key it could not express, and says which of them change what is trained; the command exits
with status 3 when one of those was dropped (0 otherwise), so a script notices. Where axolotl's default
differs from ft's (lora_dropout, warmup), axolotl's value is written. A config ft cannot train at all (an
``rl:`` method it lacks, no dataset it can read) is refused with the reason, and nothing is written.

The plugin also registers key hints (``ft_register_key_hints``): an axolotl key met in an ft config
is reported with what to write instead (``adapter: lora`` -> ``plugins: [lora]``).

Not a feature: it is loaded with ft and can be blocked (``-p no:axolotl``).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft import hookimpl
from ft.api import Plugin

PLUGIN = Plugin()

EXIT_DROPPED_TRAINING = 3  # `ft convert` wrote the config but dropped something that changes training


@dataclass
class Note:
    """An axolotl key (path) that ft could not express, or expressed with a caveat."""

    key: str
    value: Any
    reason: str
    changes_training: bool
    expressed: bool = False  # translated, with a caveat worth reading


@dataclass
class Conversion:
    """The ft config (plain data, in writing order) and the notes about what did not carry over."""

    config: dict[str, Any]
    notes: list[Note] = field(default_factory=list)

    @property
    def dropped_training(self) -> list[Note]:
        return [n for n in self.notes if n.changes_training and not n.expressed]

    def to_yaml(self, source: str | None = None) -> str:
        import yaml

        head = [f"# Converted from {source or 'an axolotl config'} by `ft convert` (axolotl -> ft).",
                "# Check it with `ft validate`; keys are explained in docs/config.md.", "#"]
        groups = (
            ("NOT expressed in ft, and they change training -- review them:",
             [n for n in self.notes if n.changes_training and not n.expressed]),
            ("Not expressed in ft (no effect on the trained weights):",
             [n for n in self.notes if not n.changes_training and not n.expressed]),
            ("Translated, with a caveat:", [n for n in self.notes if n.expressed]),
        )
        for title, notes in groups:
            if not notes:
                continue
            head.append(f"# {title}")
            for n in notes:
                head.append(f"#   {n.key}: {_short(n.value)}  -- {n.reason}")
            head.append("#")
        if len(head) == 3:
            head.append("# Every key was expressed.")
        body = yaml.dump(self.config, Dumper=_dumper(), sort_keys=False, allow_unicode=True, width=110)
        return "\n".join(head) + "\n" + body


def _dumper() -> type:
    import yaml

    class Dumper(yaml.SafeDumper):
        """Block mappings; short lists of scalars inline ([lora, packing]); multi-line text as a block."""

    def scalars(dumper: Any, items: list) -> Any:
        flow = all(isinstance(x, (str, int, float, bool)) and not (isinstance(x, str) and "\n" in x) for x in items)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=flow and len(items) <= 12)

    def text(dumper: Any, value: str) -> Any:
        style = ("|" if value.strip() else '"') if "\n" in value else None  # a bare newline (a separator): "\n"
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(list, scalars)
    Dumper.add_representer(str, text)
    return Dumper


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else value
    text = text.replace("\n", "\\n")
    return text if len(text) <= 60 else text[:57] + "..."


# -- what maps where -------------------------------------------------------------------------------

# axolotl key -> ft core key, same meaning (values are checked/coerced below)
SAME_CORE = (
    "base_model", "val_set_size", "sequence_len", "dataset_prepared_path", "dataset_num_proc", "output_dir",
    "micro_batch_size", "eval_batch_size", "gradient_accumulation_steps", "learning_rate", "num_epochs", "max_steps",
    "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm", "bf16", "fp16", "gradient_checkpointing_kwargs",
    "seed", "save_total_limit", "logging_steps", "resume_from_checkpoint", "dataloader_num_workers", "train_on_inputs",
    "evals_per_epoch", "saves_per_epoch", "early_stopping_patience", "load_best_model_at_end",
    "metric_for_best_model", "greater_is_better", "lr_scheduler_kwargs", "cosine_min_lr_ratio",
    "eval_sample_packing", "tokens",
)
RENAMED_CORE = {
    "tokenizer_config": "tokenizer", "dataset_processes": "dataset_num_proc", "shuffle_merged_datasets": "shuffle",
}
FLOATS = ("learning_rate", "val_set_size", "num_epochs", "warmup_ratio", "weight_decay", "max_grad_norm",
          "cosine_min_lr_ratio")

# Keys with no effect on the trained weights (performance, logging, hardware, bookkeeping): dropped
# with a comment. "" = nothing to say beyond "not needed in ft".
NO_EFFECT: dict[str, str] = {
    "strict": "axolotl's `strict` is about config checking; ft's `strict: true` turns dropped rows into errors",
    "xformers_attention": "xformers attention is not offered; ft uses hf.attn_implementation",
    "flash_attn_cross_entropy": "a kernel choice; see the liger plugin", "flash_attn_rms_norm": "a kernel choice",
    "flash_attn_fuse_qkv": "a kernel choice", "flash_attn_fuse_mlp": "a kernel choice", "flash_optimum": "",
    "pad_to_sequence_len": "ft pads each batch to its longest row (or packs)", "sample_packing_eff_est": "",
    "sample_packing_group_size": "", "sample_packing_bin_size": "", "sample_packing_sequentially": "",
    "sample_packing_mp_start_method": "", "multipack_real_batches": "", "total_num_tokens": "",
    "total_supervised_tokens": "", "gc_steps": "", "torch_empty_cache_steps": "", "gc_collect_steps": "",
    "max_memory": "", "gpu_memory_limit": "", "low_cpu_mem_usage": "", "device_map": "", "lora_on_cpu": "",
    "ddp_timeout": "", "ddp_bucket_cap_mb": "", "ddp_broadcast_buffers": "", "ddp_find_unused_parameters": "",
    "dataloader_pin_memory": "", "dataloader_prefetch_factor": "", "dataloader_drop_last": "",
    "profiler_steps": "", "profiler_steps_start": "", "include_tokens_per_second": "", "include_tkps": "",
    "save_safetensors": "ft always writes safetensors", "save_only_model": "", "save_first_step": "",
    "eval_table_size": "", "eval_max_new_tokens": "", "eval_causal_lm_metrics": "", "do_causal_lm_eval": "",
    "do_bench_eval": "", "bench_dataset": "", "bench_split": "", "eval_sequence_len": "",
    "cut_cross_entropy": "a memory-saving loss kernel (same loss); see the liger plugin",
    "lora_mlp_kernel": "", "lora_qkv_kernel": "", "lora_o_kernel": "", "lora_embedding_kernel": "",
    "unsloth_cross_entropy_loss": "", "unsloth_lora_mlp": "", "unsloth_lora_qkv": "", "unsloth_lora_o": "",
    "unsloth_rms_norm": "", "unsloth_rope": "", "activation_offloading": "memory only",
    "tiled_mlp": "memory only", "chunked_cross_entropy": "memory only (same loss)",
    "torchdistx_path": "", "auto_resume_from_checkpoints": "ft resumes from the run's last checkpoint by default",
    "debug": "", "local_rank": "", "world_size": "", "ddp": "", "is_preprocess": "", "preprocess_iterable": "",
    "axolotl_config_path": "", "push_dataset_to_hub": "", "hf_use_auth_token": "log in with `hf auth login`",
    "dataset_keep_in_memory": "", "skip_prepare_dataset": "", "num_dataset_shards_to_save": "",
    "mean_resizing_embeddings": "", "resize_token_embeddings_to_32x": "", "shrink_embeddings": "",
    "merge_lora": "run `ft merge OUTPUT_DIR` after training", "merge_method": "", "lora_model_merge": "",
    "sequence_parallel_degree": "sequence parallelism is not offered", "context_parallel_size": "",
    "tensor_parallel_size": "tensor parallelism is not offered", "dp_shard_size": "", "dp_replicate_size": "",
    "experimental_skip_move_to_device": "", "tokenizer_use_fast": "ft needs a fast tokenizer",
    "tokenizer_legacy": "", "tokenizer_save_jinja_files": "", "processor_type": "", "remove_unused_columns": "",
    "wandb_watch": "", "wandb_log_model": "", "wandb_run_id": "", "wandb_mode": "set WANDB_MODE in the environment",
    "mlflow_tracking_uri": "set MLFLOW_TRACKING_URI in the environment",
    "mlflow_experiment_name": "set MLFLOW_EXPERIMENT_NAME in the environment",
    "mlflow_run_name": "", "hf_mlflow_log_artifacts": "", "comet_api_key": "set COMET_API_KEY in the environment",
    "comet_workspace": "set COMET_WORKSPACE", "comet_project_name": "set COMET_PROJECT_NAME", "comet_experiment_key": "",
    "comet_mode": "", "comet_online": "", "comet_experiment_config": "", "hub_revision": "",
    "torch_dtype": "axolotl derives it from bf16/fp16/float16 and overwrites this key (resolve_dtype)",
    "fsdp_final_state_dict_type": "", "deepcompile": "", "fp32_norms": "", "logging_dir": "",
    "chat_template_save_jinja": "", "use_ray": "", "ray_num_workers": "", "ray_run_name": "",
    "use_kernels": "a kernel choice (same maths)", "use_scattermoe": "a MoE kernel choice (same maths)",
    "use_sonicmoe": "a MoE kernel choice (same maths)", "experts_implementation": "a MoE kernel choice",
    "liger_rms_norm_gated": "a kernel choice (same maths)", "fused_attn_kernel": "a kernel choice",
    "flex_attn_compile_kwargs": "", "gemma4_hybrid_attn_impl": "an attention kernel choice",
    "expert_parallel_size": "expert parallelism is not offered (a layout, same training)",
    "expert_parallel_token_capacity": "", "expert_parallel_num_nvl_bytes": "",
    "tokenizer_use_mistral_common": "ft uses the Hugging Face tokenizer of the repository (its Mistral "
    "templates are checked against mistral-common)",
    "use_swanlab": "SwanLab is not a reporter of ft", "swanlab_project": "", "swanlab_experiment_name": "",
    "swanlab_description": "", "swanlab_mode": "", "swanlab_workspace": "", "swanlab_log_completions": "",
    "swanlab_completion_log_interval": "", "swanlab_completion_max_buffer": "",
    "use_dsv4_kernels": "a kernel choice (same maths)", "use_glm_dsa_kernels": "a kernel choice (same maths)",
    "base_model_ignore_patterns": "ft loads safetensors only (hf.allow_pickle: false)",
    "accelerator_config": "accelerate's own settings (gradient-accumulation syncing: same gradients)",
    "adam_eps": "not an axolotl key, so axolotl ignores it (adam_epsilon sets the epsilon)",
    "use_otel_metrics": "", "otel_metrics_host": "", "otel_metrics_port": "", "streaming_multipack_buffer_size": "",
}
# Keys that change what is trained and have no ft equivalent (yet).
CHANGES_TRAINING: dict[str, str] = {
    "lora_fan_in_fan_out": "peft decides fan-in/fan-out from the layer type",
    "lora_target_parameters": "", "lora_rank_pattern": "", "lora_alpha_pattern": "",
    "peft_layers_to_transform": "", "peft_layers_pattern": "", "peft_layer_replication": "",
    "peft_init_lora_weights": "", "peft_trainable_token_indices": "", "loftq_config": "", "peft": "",
    "loraplus_lr_ratio": "LoRA+ learning rates are not offered", "loraplus_lr_embedding": "",
    "relora": "ReLoRA is not offered", "relora_steps": "", "relora_warmup_steps": "", "relora_anneal_steps": "",
    "relora_prune_ratio": "", "relora_cpu_offload": "",
    "neftune_noise_alpha": "NEFTune noise is not offered", "unfrozen_parameters": "partial freezing is not offered",
    "adam_beta3": "", "adam_epsilon2": "",
    "optim_args": "", "optim_target_modules": "", "lr_groups": "", "embedding_lr": "", "embedding_lr_scale": "",
    "lr_quadratic_warmup": "", "lr_div_factor": "", "cosine_constant_lr_ratio": "",
    "group_by_length": "batches by length change the batches", "default_system_message": "",
    "chat_template_kwargs": "", "dataset_exact_deduplication": "", "dataset_shard_num": "",
    "dataset_shard_idx": "", "min_sample_len": "",
    "added_tokens_overrides": "", "fix_untrained_tokens": "", "gptq": "GPTQ models are not offered",
    "fp8": "fp8 training is not offered", "qat": "", "quantization": "", "s2_attention": "", "use_pose": "", "curriculum_sampling": "",
    "shuffle_before_merging_datasets": "", "auto_find_batch_size": "", "model_config_type": "",
    "dpo_use_weighting": "", "dpo_loss_weights": "", "dpo_padding_free": "", "dpo_use_liger_kernel": "",
    "bfloat16": "axolotl loads the weights in bf16 (no fp32 master copy); ft: bf16 mixed precision",
    "float16": "", "embeddings_skip_upcast": "", "reinit_weights": "", "trainer_cls": "",
}
KNOWN_PLUGINS = {  # axolotl `plugins:` entries -> ft plugin (None: no ft equivalent, and why)
    "axolotl.integrations.liger.LigerPlugin": "liger",
    "axolotl.integrations.liger.plugin.LigerPlugin": "liger",
    "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin": None,
    "axolotl.integrations.kernels.KernelsPlugin": None,
    "axolotl.integrations.expert_parallel.ExpertParallelPlugin": None,
    "axolotl.integrations.swanlab.SwanLabPlugin": None,
}
# axolotl integrations with no effect on the trained weights, and what ft does instead
PLUGINS_NO_EFFECT = {
    "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin":
        "cut cross-entropy (same loss, less memory): ft's fused_loss plugin, always on, fuses the LM head and the "
        "loss over the trained tokens for the architectures it supports (see `ft plugins`)",
    "axolotl.integrations.kernels.KernelsPlugin": "kernels (same maths); ft uses the model's own modules",
    "axolotl.integrations.expert_parallel.ExpertParallelPlugin": "expert parallelism is not offered (a layout, "
        "same training)",
    "axolotl.integrations.swanlab.SwanLabPlugin": "SwanLab is not a reporter of ft",
}
# axolotl lora_* / peft_* key -> field of ft's lora: section (lora_target_linear is converted in code)
LORA_KEYS = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
             "lora_target_modules": "target_modules", "lora_modules_to_save": "modules_to_save",
             "peft_use_dora": "use_dora", "peft_use_rslora": "use_rslora", "lora_model_dir": "init_from"}
# axolotl wandb_* keys that are fields of ft's wandb: section (without the prefix)
WANDB_KEYS = ("wandb_project", "wandb_entity", "wandb_name", "wandb_tags", "wandb_group", "wandb_notes")
LIGER_KEYS = {"liger_rope": "rope", "liger_rms_norm": "rms_norm", "liger_glu_activation": "swiglu",
              "liger_swiglu": "swiglu", "liger_fused_linear_cross_entropy": "fused_linear_cross_entropy"}
ATTENTION = {"flash_attention": "flash_attention_2", "sdp_attention": "sdpa", "eager_attention": "eager",
             "flex_attention": "flex_attention"}
# axolotl chat_template names -> ft shipped template (None: the tokenizer's own)
TEMPLATES = {
    "chatml": "chatml", "llama3": "llama3", "llama2": "llama2", "gemma": "gemma", "gemma3": "gemma",
    "phi_3": "phi_3", "phi_35": "phi_3", "phi_4": "phi_4", "deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3",
    "mistral_v1": "mistral_v1", "mistral_v2v3": "mistral_v2v3", "mistral_v3_tekken": "mistral_v3_tekken",
    "mistral_v7_tekken": "mistral_v7_tekken", "qwen_25": "qwen", "tokenizer_default": None,
}
# Same-named templates whose rendering differs from axolotl's (checked in tests/plugins/test_axolotl.py by rendering
# axolotl's jinja next to ft's): the difference, flagged when the template is converted.
TEMPLATE_DIFFERS = {
    "phi_3": "axolotl's phi_3 starts every conversation with the BOS token (<s>); ft's does not",
    "phi_4": "axolotl's phi_4 inserts its long default system prompt when a conversation has none; ft's does not",
    "mistral_v7_tekken": "axolotl's mistral_v7_tekken inserts a default system prompt (with today's date) when a "
                         "conversation has none; ft's does not",
    "deepseek_v2": "axolotl's deepseek_v2 uses the <｜User｜>/<｜Assistant｜> markers; ft's renders DeepSeek-V2's "
                   "'User: ... Assistant:'",
}
# axolotl's templates that drop a system message; ft's fold it into the first user turn (as mistral-common
# does), so the converter writes drop_system_message: true on the entries, which renders as axolotl does.
TEMPLATE_DROPS_SYSTEM = ("mistral_v2v3", "mistral_v3_tekken")
SFT_TYPES = {"chat_template": "chat_template", "alpaca": "alpaca", "completion": "completion",
             "input_output": "input_output", "sharegpt": "chat_template", "sharegpt:chat": "chat_template",
             "chat_template.default": "chat_template"}
ENTRY_SAME = ("path", "split", "name", "data_files", "revision", "ds_type", "field_messages", "message_property_mappings",
              "roles", "roles_to_train", "train_on_eos", "message_field_training", "field_system", "field_tools",
              "field_thinking", "drop_system_message", "field", "train_on_inputs")
ENTRY_NO_EFFECT = {"trust_remote_code": "set hf.trust_remote_code for code that ships with a dataset",
                   "preprocess_shards": "", "template_thinking_key": "ft hands the reasoning to templates as "
                   "reasoning_content"}
ENTRY_CHANGES = {"shards": "only a shard of the rows", "shards_idx": "", "input_transform": "",
                 "message_field_training_detail": "per-character training spans are not offered",
                 "split_thinking": "", "logprobs_field": "", "temperature": "", "input_format": ""}
RL_METHODS = {"dpo": "dpo", "ipo": "dpo", "kto": "kto", "orpo": "orpo", "simpo": "simpo", "grpo": "grpo", "ebft": "ebft"}
ONLINE = ("grpo", "ebft")  # methods that generate: prompts for data, the trl: block for their settings
# axolotl's reward_model / process_reward_model flags -> ft method, its model class and label count
REWARD_FLAGS = {"reward_model": ("reward_model", "ForSequenceClassification", 1),
                "process_reward_model": ("prm", "ForTokenClassification", 2)}
# axolotl's bradley_terry.chat_template reads a row's system, input, chosen and rejected texts
BRADLEY_TERRY = {"field_prompt": "input", "field_chosen": "chosen", "field_rejected": "rejected",
                 "field_system": "system"}
# axolotl's EBFT transforms that ship with axolotl, as ft's prompt_reference fields (the prompt is the user message)
EBFT_STRUCTURED = {"ebft_opencode.transform": {"field_prompt": "input", "field_reference": "output"}}
# axolotl's strided transforms that place anchors in the completion of a prompt/completion row or a chat:
# ft's strided type reads raw documents only
EBFT_STRIDED_SPANS = ("ebft_strided_structured", "ebft_strided_chat", "ebft_reasoning.transform_strided")
# dataset-entry keys ft's preference types take as axolotl means them (roles, mappings, what is trained)
PREFERENCE_SAME = ("roles", "message_property_mappings", "roles_to_train", "train_on_eos", "drop_system_message",
                   "field_thinking", "field_tools")
NO_PROMPT_FIELD = "_no_prompt_column"  # names no column: ft then takes the prompt from the shared messages
PREFERENCE_TYPES = {  # axolotl rl dataset type prefix/suffix -> ft preference fields
    "intel": {"field_prompt": "question", "field_chosen": "chosen", "field_rejected": "rejected",
              "field_system": "system"},
    "argilla": {"field_prompt": "instruction", "field_chosen": "chosen_response",
                "field_rejected": "rejected_response"},
    "argilla_chat": {"field_chosen": "chosen", "field_rejected": "rejected"},
    "ultra": {"field_prompt": "prompt", "field_chosen": "chosen", "field_rejected": "rejected"},
    "icr": {"field_prompt": "input", "field_chosen": "chosen", "field_rejected": "rejected"},
    "prompt_pairs": {"field_prompt": "prompt", "field_chosen": "chosen", "field_rejected": "rejected"},
    "default": {"field_messages": "messages", "field_chosen": "chosen", "field_rejected": "rejected"},
}


# -- the conversion --------------------------------------------------------------------------------


class _Converter:
    def __init__(self, data: dict[str, Any]):
        self.data = data
        self.core: dict[str, Any] = {}
        self.plugins: list[str] = []
        self.sections: dict[str, dict[str, Any]] = {}
        self.notes: list[Note] = []
        self.method: str | None = None
        self.source: str | None = None
        self.pretraining: dict[str, Any] | None = None  # the streamed entry of pretraining_dataset
        self.streamed = False  # axolotl's streaming: true

    # helpers
    def note(self, key: str, value: Any, reason: str, changes_training: bool, expressed: bool = False) -> None:
        self.notes.append(Note(key, value, reason, changes_training, expressed))

    def select(self, *plugins: str) -> None:
        for p in plugins:
            if p not in self.plugins:
                self.plugins.append(p)

    def section(self, name: str) -> dict[str, Any]:
        return self.sections.setdefault(name, {})

    def report_to(self, name: str) -> None:
        names = self.core.setdefault("report_to", [])
        if name not in names:
            names.append(name)

    def run(self) -> Conversion:
        data = self.data
        rl = data.get("rl")
        if rl:
            self.convert_rl(rl)
        else:
            self.convert_reward_flags()
        for key, value in data.items():
            if key in ("rl", "trl", "ebft") or key.startswith(("rl_", "kto_", "orpo_", "simpo_", "cpo_")):
                continue  # converted with the method
            handler = getattr(self, f"key_{key}", None)
            if handler is not None:
                handler(value)
            elif key in LIGER_KEYS:
                self._liger(key, value)
            elif key in ATTENTION:
                if value:
                    self.section("hf")["attn_implementation"] = ATTENTION[key]
            elif key.startswith("lora_") or key.startswith("peft_use_"):
                self._lora(key, value)
            elif key in WANDB_KEYS:
                self._wandb(key, value)
            elif key.startswith("fsdp_") and key not in ("fsdp_final_state_dict_type",):
                self._fsdp_flat(key, value)
            elif key in SAME_CORE:
                self.copy(key, key, value)
            elif key in RENAMED_CORE:
                self.copy(key, RENAMED_CORE[key], value)
            elif value is None or value is False or value == "" or value == [] or value == {}:
                continue  # unset or off: what ft does anyway
            elif key in NO_EFFECT:
                self.note(key, value, NO_EFFECT[key] or "not needed in ft", False)
            elif key in CHANGES_TRAINING:
                self.note(key, value, CHANGES_TRAINING[key] or "no ft equivalent", True)
            else:
                self.note(key, value, "unknown to `ft convert`; no ft equivalent known", True)
        self.finish()
        return Conversion(self.assemble(), self.notes)

    def finish(self) -> None:
        """axolotl's effective values where its default differs from ft's, and no combination validate refuses."""
        data = self.data
        self.finish_streaming()
        if self.method == "ebft" and self.ebft_strided():
            n = self.sections["ebft"]["num_generations"]
            mbs = int(data.get("micro_batch_size") or 1)
            self.core["micro_batch_size"] = mbs * n
            self.note("micro_batch_size", mbs, f"axolotl's strided micro-batch is {mbs} whole document(s), each with "
                      f"{n} rollouts at every anchor; ft's holds completions, one anchor's group of {n} per document: "
                      f"micro_batch_size {mbs * n} (fewer anchors per step)", True, expressed=True)
        if self.method in ("reward_model", "prm") and self.core.get("train_on_inputs"):
            del self.core["train_on_inputs"]
            self.note("train_on_inputs", True, f"method {self.method} has no language-model labels; axolotl does not "
                      "read it there", False)
        # axolotl's defaults, written explicitly
        if "lora" in self.plugins and "dropout" not in self.section("lora"):
            self.section("lora")["dropout"] = 0.0  # axolotl: lora_dropout defaults to 0.0 (ft: 0.05)
        if data.get("warmup_steps") is None and data.get("warmup_ratio") is None:
            if data.get("max_steps"):  # axolotl: min(3% of the steps, 100), and never 1
                steps = min(int(0.03 * int(data["max_steps"])), 100)
                self.core["warmup_steps"] = 2 if steps == 1 else steps
            else:
                self.core["warmup_ratio"] = 0.03
                self.note("warmup_ratio", 0.03, "axolotl's default warmup when none is set: 3% of the steps (axolotl "
                          "also caps it at 100 steps, which ft does not: set warmup_steps for runs over 3,333 steps)",
                          True, expressed=True)
        # a section only with its plugin (validate refuses a section of an unselected plugin)
        for name in ("lora", "qlora", "liger", "compile", "fsdp", "deepspeed"):
            if name in self.sections and name not in self.plugins:
                if self.sections.pop(name):
                    self.note(name, name, f"settings for the {name} plugin, which this config does not use "
                              "(e.g. no adapter: a full fine-tune); left out", False)
        if "qlora" in self.plugins and "fsdp" in self.plugins and self.sections.get("qlora", {}).get("bits") == 8:
            self.plugins.remove("fsdp")  # written as is, the config would not validate
            self.sections.pop("fsdp", None)
            self.note("fsdp", "with an 8-bit base", "8-bit weights cannot be sharded: fsdp left out, so each GPU holds "
                      "the whole 8-bit base (plain data parallel); use load_in_4bit to shard it (QLoRA + FSDP2)", True)
        optimizer = self.core.get("optimizer")
        if self.sections.get("deepspeed", {}).get("offload_optimizer") and optimizer not in (
                None, "adamw_torch", "adamw_torch_fused"):
            self.core["optimizer"] = "adamw_torch_fused"
            self.note("optimizer", optimizer, "with ZeRO-Offload DeepSpeed steps its own CPU Adam(W), not this "
                      "optimizer: adamw_torch_fused written (ft validate refuses any other with offload_optimizer)", True)
        if self.sections.get("fsdp", {}).get("save") == "sharded" and "lora" in self.plugins:
            del self.sections["fsdp"]["save"]
            self.note("fsdp_config.state_dict_type", "SHARDED_STATE_DICT", "a LoRA adapter is small: ft saves it whole "
                      "(same weights)", False, expressed=True)
        if "compile" in self.plugins:
            mode = self.sections.get("compile", {}).get("mode")
            if mode in ("max-autotune", "reduce-overhead"):
                self.sections["compile"]["mode"] = "max-autotune-no-cudagraphs"
                self.note("torch_compile_mode", mode, "ft does not capture CUDA graphs in training: "
                          "max-autotune-no-cudagraphs (same maths)", False, expressed=True)
            if "liger" in self.plugins:  # ft refuses compile with liger: keep the kernels, drop compile (speed only)
                self.plugins.remove("compile")
                self.sections.pop("compile", None)
                self.note("torch_compile", True, "ft does not compile together with the liger kernels; compile left "
                          "out (speed only)", False)
        if self.core.get("evals_per_epoch") == 0:
            del self.core["evals_per_epoch"]
            if not self.core.get("eval_steps"):
                self.core["eval_strategy"] = "no"  # axolotl: 0 evaluations per epoch = none during training
        if self.core.get("saves_per_epoch") == 0:
            del self.core["saves_per_epoch"]
            if not self.core.get("save_steps"):
                self.core["save_strategy"] = "no"
        if not self.core.get("datasets"):
            from ft.api import FtError

            why = [f"{n.key}: {n.reason}" for n in self.notes if n.key.startswith(("datasets", "pretraining_dataset"))]
            raise FtError(f"{self.source or 'the axolotl config'}: no dataset could be converted, so ft would have "
                          "nothing to train on" + (": " + "; ".join(why) if why else "") + ". Nothing was written.")

    def key_warmup_steps(self, value: Any) -> None:
        if isinstance(value, float) and 0 < value < 1:  # transformers (v5) reads a warmup_steps below 1 as a ratio
            self.core["warmup_ratio"] = value
            self.note("warmup_steps", value, "a warmup_steps below 1 is a fraction of the steps: warmup_ratio", False,
                      expressed=True)
        elif value is not None:
            self.core["warmup_steps"] = int(value)

    def key_adam_beta1(self, value: Any) -> None:
        self._adam("beta1", value)

    def key_adam_beta2(self, value: Any) -> None:
        self._adam("beta2", value)

    def key_adam_epsilon(self, value: Any) -> None:
        self._adam("epsilon", value)

    def _adam(self, name: str, value: Any) -> None:
        if value is not None:
            self.section("adam")[name] = float(value)

    def key_loss_watchdog_threshold(self, value: Any) -> None:
        if value is not None:
            self.note("loss_watchdog_threshold", value, "ft's health plugin (always on) stops on a NaN/inf loss and "
                      "warns about a loss that does not fall or collapses (health: section); it has no loss threshold",
                      False, expressed=True)

    def key_loss_watchdog_patience(self, value: Any) -> None:
        pass  # goes with loss_watchdog_threshold

    def assemble(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("base_model", "tokenizer"):
            if key in self.core:
                out[key] = self.core.pop(key)
        if self.method:
            out["method"] = self.method
        if self.plugins:
            out["plugins"] = list(self.plugins)
        for key in ("datasets", "test_datasets"):
            if key in self.core:
                out[key] = self.core.pop(key)
        out.update(self.core)
        for name in sorted(self.sections, key=_section_order):
            if self.sections[name] or name in self.plugins:
                out[name] = self.sections[name]
        return out

    def copy(self, src: str, dst: str, value: Any) -> None:
        if value is None:
            return
        if dst in FLOATS and isinstance(value, str):
            try:
                value = float(value)  # YAML reads 2e-5 (no dot) as text; axolotl accepts it
            except ValueError:
                pass
        if dst == "bf16" and value == "full":
            value = True
            self.note(src, "full", "ft trains in bf16 mixed precision (fp32 master weights)", True, expressed=True)
        self.core[dst] = value

    # -- core keys with a twist ------------------------------------------------------------------

    def key_datasets(self, value: Any) -> None:
        self.core["datasets"] = self.convert_entries("datasets", value)

    def key_test_datasets(self, value: Any) -> None:
        if value:
            self.core["test_datasets"] = self.convert_entries("test_datasets", value)

    def key_special_tokens(self, value: Any) -> None:
        if not value:
            return
        special = {k: v for k, v in value.items() if k != "additional_special_tokens" and v is not None}
        if special:
            self.core["special_tokens"] = special
        extra = value.get("additional_special_tokens")
        if extra:
            tokens = self.core.setdefault("tokens", [])
            tokens.extend(t for t in extra if t not in tokens)
            self.note("special_tokens.additional_special_tokens", extra, "added to `tokens`", False, expressed=True)

    def key_tokens(self, value: Any) -> None:
        if value:
            tokens = self.core.setdefault("tokens", [])
            tokens.extend(t for t in value if t not in tokens)

    def key_batch_size(self, value: Any) -> None:
        if value and "gradient_accumulation_steps" not in self.data and self.data.get("micro_batch_size"):
            self.core["gradient_accumulation_steps"] = max(1, int(value) // int(self.data["micro_batch_size"]))
            self.note("batch_size", value, "became gradient_accumulation_steps (batch_size / micro_batch_size)",
                      False, expressed=True)

    def key_tf32(self, value: Any) -> None:
        if isinstance(value, bool):
            self.core["tf32"] = value

    def key_gradient_checkpointing(self, value: Any) -> None:
        if value in ("offload", "offload_disk"):
            self.core["gradient_checkpointing"] = True
            self.note("gradient_checkpointing", value, "offloading activations is not offered; plain "
                      "gradient checkpointing is on", False, expressed=True)
        elif value is not None:
            self.core["gradient_checkpointing"] = bool(value)

    def key_excess_length_strategy(self, value: Any) -> None:
        if value:
            self.core["excess_length"] = {"raise": "error"}.get(value, value)

    def key_eval_steps(self, value: Any) -> None:
        self._steps("eval_steps", value)

    def key_save_steps(self, value: Any) -> None:
        self._steps("save_steps", value)

    def _steps(self, key: str, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, float) and value < 1:
            per = "evals_per_epoch" if key == "eval_steps" else "saves_per_epoch"
            self.note(key, value, f"a fraction of the run is not offered; use {per}", False)
            return
        self.core[key] = int(value)

    def key_eval_strategy(self, value: Any) -> None:
        if value in ("steps", "epoch", "no"):
            self.core["eval_strategy"] = value
        elif value:
            self.note("eval_strategy", value, "ft evaluates by steps, epoch, or no", False)

    key_evaluation_strategy = key_eval_strategy

    def key_save_strategy(self, value: Any) -> None:
        if value in ("steps", "epoch", "no"):
            self.core["save_strategy"] = value
        elif value:
            self.note("save_strategy", value, "ft saves by steps, epoch, or no (keep the best with "
                      "load_best_model_at_end)", False)

    def key_optimizer(self, value: Any) -> None:
        if not value:
            return
        if value in registered_names("optimizers"):  # the names the installed plugins register
            self.core["optimizer"] = value
        else:
            self.note("optimizer", value, "not offered; ft trains with adamw_torch (see `ft plugins` for the "
                      "optimizer names plugins register)", True)

    def key_lr_scheduler(self, value: Any) -> None:
        if not value:
            return
        if value in registered_names("schedulers"):
            self.core["lr_scheduler"] = value
        else:
            self.note("lr_scheduler", value, "not offered; ft uses cosine", True)

    def key_base_model_config(self, value: Any) -> None:
        if value and value != self.data.get("base_model"):
            self.note("base_model_config", value, "ft reads the model config from base_model", True)

    def key_model_type(self, value: Any) -> None:
        # ft loads AutoModelForCausalLM, which picks the checkpoint's *ForCausalLM class itself; a reward model
        # (prm) method loads the *ForSequenceClassification (*ForTokenClassification) head itself
        head = next((suffix for method, suffix, _ in REWARD_FLAGS.values() if method == self.method), "ForCausalLM")
        if value and not str(value).endswith(head):
            if head != "ForCausalLM":
                self.note("model_type", value, f"method {self.method} loads the model as AutoModel{head}; this "
                          "model class is not offered with it", True)
                return
            self.note("model_type", value, "ft trains causal language models (AutoModelForCausalLM); this model "
                      "class (a classification, vision or encoder head) is not offered", True)

    def key_tokenizer_type(self, value: Any) -> None:
        if value and not str(value).startswith(("AutoTokenizer", "PreTrainedTokenizerFast")):
            self.note("tokenizer_type", value, "ft loads AutoTokenizer (a fast tokenizer)", False)

    def key_trust_remote_code(self, value: Any) -> None:
        if value:
            self.section("hf")["trust_remote_code"] = True

    def key_attn_implementation(self, value: Any) -> None:
        if value:
            self.section("hf")["attn_implementation"] = value

    def key_revision_of_model(self, value: Any) -> None:
        if value:
            self.section("hf")["revision"] = str(value)

    def key_pad_to_multiple_of(self, value: Any) -> None:
        if value:
            self.section("hf")["pad_to_multiple_of"] = int(value)

    # -- chat templates --------------------------------------------------------------------------

    def template(self, key: str, value: Any, jinja: Any = None) -> tuple[bool, Any]:
        """(set?, ft chat_template value) for an axolotl chat_template value."""
        if value in (None, ""):
            return (True, jinja) if jinja else (False, None)
        if value == "jinja" or jinja:
            if not jinja:
                self.note(key, value, "chat_template: jinja without chat_template_jinja", True)
                return False, None
            return True, jinja
        if str(value).startswith("tokenizer_default_fallback_"):
            fallback = str(value)[len("tokenizer_default_fallback_"):]
            self.note(key, value, f"ft uses the tokenizer's own template and says so when it has none (then set "
                      f"chat_template: {TEMPLATES.get(fallback, fallback)})", False, expressed=True)
            return True, None
        if value in TEMPLATES:
            if value in TEMPLATE_DIFFERS:
                self.note(key, value, TEMPLATE_DIFFERS[value] + " (use the model's own template, or write the jinja "
                          "you want as chat_template)", True)
            return True, TEMPLATES[value]
        self.note(key, value, "not shipped with ft; the tokenizer's own template is used (check that it renders "
                  "like axolotl's)", True, expressed=True)
        return True, None

    def key_chat_template(self, value: Any) -> None:
        ok, spec = self.template("chat_template", value, self.data.get("chat_template_jinja"))
        if ok and spec is not None:
            self.core["chat_template"] = spec

    def key_chat_template_jinja(self, value: Any) -> None:
        if value and not self.data.get("chat_template"):
            self.core["chat_template"] = value

    def key_vllm(self, value: Any) -> None:
        if value and self.method not in ONLINE:
            self.note("vllm", "{...}", "ft generates with vLLM for methods grpo and ebft only", False)
        # with grpo: read with the trl: block (convert_trl)

    def key_eot_tokens(self, value: Any) -> None:
        pass  # put on every chat dataset entry (convert_entries)

    # -- adapters and quantization ---------------------------------------------------------------

    def key_adapter(self, value: Any) -> None:
        if value in ("lora", "qlora"):
            self.select("lora")
            self.section("lora")
            if value == "qlora":
                self.select("qlora")
                self.section("qlora").setdefault("bits", 4)
        elif value:
            self.note("adapter", value, "only lora and qlora adapters are offered", True)

    def _lora(self, key: str, value: Any) -> None:
        if value is None:
            return
        if key == "lora_target_linear":
            if value:
                self.section("lora")["target_modules"] = "all-linear"
                if self.data.get("lora_target_modules"):
                    self.note("lora_target_modules", self.data["lora_target_modules"],
                              "lora_target_linear covers them: all-linear", False, expressed=True)
            return
        if key == "lora_target_modules" and self.data.get("lora_target_linear"):
            return
        if key in LORA_KEYS:
            if not self.data.get("adapter"):
                if key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules") and value in ([], None):
                    return
                self.note(key, value, "there is no adapter (full fine-tune); ignored", False)
                return
            if value == [] or value == "":
                return
            self.section("lora")[LORA_KEYS[key]] = value
        elif value not in (None, False, "", [], {}):
            reason = CHANGES_TRAINING.get(key) or NO_EFFECT.get(key)
            self.note(key, value, reason or "no ft equivalent", key not in NO_EFFECT)

    def key_load_in_4bit(self, value: Any) -> None:
        self._quantized(4, value)

    def key_load_in_8bit(self, value: Any) -> None:
        self._quantized(8, value)

    def _quantized(self, bits: int, value: Any) -> None:
        if not value:
            return
        if self.data.get("adapter") not in ("lora", "qlora"):
            self.note(f"load_in_{bits}bit", value, "a quantized base trains only with an adapter (adapter: lora)", True)
            return
        self.select("lora", "qlora")
        self.section("qlora")["bits"] = bits

    def key_bnb_config_kwargs(self, value: Any) -> None:
        if not value:
            return
        q = self.section("qlora")
        names = {"bnb_4bit_quant_type": "quant_type", "bnb_4bit_use_double_quant": "double_quant",
                 "bnb_4bit_compute_dtype": "compute_dtype"}
        for k, v in value.items():
            if k in names:
                q[names[k]] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(v, v)
            elif k == "bnb_4bit_quant_storage":  # how the packed bytes are typed, not their values
                self.note(f"bnb_config_kwargs.{k}", v, "ft stores 4-bit weights as uint8, or in the compute dtype "
                          "with fsdp (same values)", False, expressed=True)
            elif k not in ("llm_int8_has_fp16_weight",):
                self.note(f"bnb_config_kwargs.{k}", v, "no ft equivalent", True)

    # -- packing, kernels, compile ---------------------------------------------------------------

    def key_sample_packing(self, value: Any) -> None:
        if value:
            self.select("packing")

    def key_plugins(self, value: Any) -> None:
        for name in value or []:
            if name in KNOWN_PLUGINS and KNOWN_PLUGINS[name]:
                self.select(KNOWN_PLUGINS[name])
                self.section(KNOWN_PLUGINS[name])
            elif name in KNOWN_PLUGINS:
                self.note(f"plugins[{name}]", name, PLUGINS_NO_EFFECT[name], False)
            else:
                self.note("plugins", name, "an axolotl integration with no ft plugin known", True)

    def _liger(self, key: str, value: Any) -> None:
        if value is None:
            return
        self.select("liger")
        self.section("liger")[LIGER_KEYS[key]] = bool(value)

    def key_liger_layer_norm(self, value: Any) -> None:
        if value:
            self.note("liger_layer_norm", value, "ft's liger plugin patches RMSNorm, RoPE, SwiGLU and the fused "
                      "loss", False)

    def key_torch_compile(self, value: Any) -> None:
        if value is True:
            self.select("compile")
            self.section("compile")
        elif value == "auto":
            self.note("torch_compile", value, "ft compiles only when asked: plugins: [compile]", False)

    def key_torch_compile_backend(self, value: Any) -> None:
        if value:
            self.section("compile")["backend"] = value

    def key_torch_compile_mode(self, value: Any) -> None:
        if value:
            self.section("compile")["mode"] = value

    # -- distributed -----------------------------------------------------------------------------

    def key_fsdp(self, value: Any) -> None:
        if not value:
            return
        self.select("fsdp")
        section = self.section("fsdp")
        opts = value if isinstance(value, list) else str(value).split()
        if "shard_grad_op" in opts:
            section["reshard_after_forward"] = False
        if "offload" in opts:
            section["offload_params"] = True

    def key_fsdp_config(self, value: Any) -> None:
        if not value:
            return
        self.select("fsdp")
        for k, v in value.items():
            self._fsdp_flat(k if k.startswith("fsdp_") else f"fsdp_{k}", v, where=f"fsdp_config.{k}")

    def key_fsdp_version(self, value: Any) -> None:
        if value and int(value) == 1:
            self.note("fsdp_version", value, "ft shards with FSDP2 (same training)", False, expressed=True)

    def _fsdp_flat(self, key: str, value: Any, where: str | None = None) -> None:
        where = where or key
        if value is None:
            return
        section = self.section("fsdp")
        name = key[len("fsdp_"):]
        if name == "offload_params":
            section["offload_params"] = bool(value)
        elif name == "transformer_layer_cls_to_wrap":
            section["wrap_layers"] = [value] if isinstance(value, str) else list(value)
        elif name == "activation_checkpointing":
            section["activation_checkpointing"] = bool(value)
        elif name == "reshard_after_forward":
            section["reshard_after_forward"] = bool(value)
        elif name == "state_dict_type":
            section["save"] = "sharded" if "SHARDED" in str(value).upper() else "full"
        elif name == "version":
            self.key_fsdp_version(value)
        elif name in ("auto_wrap_policy", "sync_module_states", "use_orig_params", "cpu_ram_efficient_loading",
                      "backward_prefetch", "forward_prefetch", "limit_all_gathers", "sharding_strategy",
                      "cpu_offload_pin_memory"):
            if name == "sharding_strategy" and "SHARD_GRAD_OP" in str(value).upper():
                section["reshard_after_forward"] = False
            elif value not in (None, False):
                self.note(where, value, "decided by ft's FSDP2 setup", False)
        elif value not in (None, False, "", []):
            self.note(where, value, "no ft equivalent", False)

    def key_deepspeed(self, value: Any) -> None:
        if not value:
            return
        self.select("deepspeed")
        section = self.section("deepspeed")
        if isinstance(value, dict):
            zero = value.get("zero_optimization", {})
            if zero.get("stage"):
                section["stage"] = int(zero["stage"])
            self.note("deepspeed", "{...}", "an inline DeepSpeed config: only the ZeRO stage was kept; write it to a "
                      "file and set deepspeed.config to use all of it", True, expressed=True)
            return
        from pathlib import Path

        base = Path(self.source).parent if self.source else Path(".")
        if (base / value).is_file() or Path(value).is_file():
            section["config"] = str(value)
            return
        match = re.search(r"zero(\d)", str(value))
        if match and match.group(1) in "123":
            section["stage"] = int(match.group(1))
            if "offload" in str(value):
                section["offload_optimizer"] = True
                if match.group(1) == "3":
                    section["offload_params"] = True
            self.note("deepspeed", value, "the file is not here: its ZeRO stage (and offload) came from its name; "
                      "set deepspeed.config to the file to use it as it is", False, expressed=True)
        else:
            section["config"] = str(value)
            self.note("deepspeed", value, "the file is not next to the config; copy it there", False, expressed=True)

    # -- tracking and hub ------------------------------------------------------------------------

    def key_use_wandb(self, value: Any) -> None:
        if value:
            self.report_to("wandb")

    def _wandb(self, key: str, value: Any) -> None:
        if not value:
            return
        self.report_to("wandb")
        self.section("wandb")[key[len("wandb_"):]] = value

    def key_use_tensorboard(self, value: Any) -> None:
        if value:
            self.report_to("tensorboard")

    def key_use_mlflow(self, value: Any) -> None:
        if value:
            self.report_to("mlflow")

    def key_use_comet(self, value: Any) -> None:
        if value:
            self.report_to("comet_ml")

    def key_report_to(self, value: Any) -> None:
        for name in [value] if isinstance(value, str) else list(value or []):
            if name and name != "none":
                self.report_to(name)

    def key_hub_model_id(self, value: Any) -> None:
        if value:
            self.section("hub")["model_id"] = value

    def key_hub_strategy(self, value: Any) -> None:
        if not value:
            return
        if value in ("end", "every_save"):
            self.section("hub")["strategy"] = value
        elif value in ("checkpoint", "all_checkpoints"):
            self.section("hub")["strategy"] = "every_save"
            self.note("hub_strategy", value, "ft pushes each checkpoint as it is written (every_save)", False,
                      expressed=True)

    def key_hub_private_repo(self, value: Any) -> None:
        if value is not None:
            self.section("hub")["private"] = bool(value)

    key_hub_private = key_hub_private_repo

    def key_push_to_hub(self, value: Any) -> None:
        pass  # hub_model_id decides

    # -- datasets --------------------------------------------------------------------------------

    def key_pretraining_dataset(self, value: Any) -> None:
        """axolotl streams its first ``pretraining_dataset`` entry (a dict, or a path string) as raw text: a streamed
        ``type: completion`` entry (``finish_streaming`` puts it in place of ``datasets``)."""
        entries = [value] if isinstance(value, (str, dict)) else list(value or [])
        if not entries:
            return
        for i, extra in enumerate(entries[1:], start=1):
            self.note(f"pretraining_dataset[{i}]", extra.get("path") if isinstance(extra, dict) else extra,
                      "axolotl trains on the first pretraining_dataset entry only; left out", False)
        first = {"path": entries[0]} if isinstance(entries[0], str) else entries[0]
        where = "pretraining_dataset[0]"
        if not isinstance(first, dict) or not first.get("path"):
            self.note(where, first, "not a mapping with a path; left out", True)
            return
        kind = first.get("type") or "pretrain"
        if kind not in ("pretrain", "completion"):
            self.note(f"{where}.type", kind, f"axolotl's '{kind}' pretraining is not offered (ft streams raw text: "
                      "pretrain or completion); the dataset was left out", True)
            return
        out: dict[str, Any] = {"path": first["path"], "type": "completion"}
        for key, item in first.items():
            if item is None or key in ("path", "type", "text_column", "field"):
                continue
            if key in ("name", "split", "data_files", "revision", "ds_type"):
                out[key] = item
            elif key == "skip" and not item:
                continue
            elif key == "skip":
                self.note(f"{where}.skip", item, "skipping the first rows of the stream is not offered", True)
            elif key in ENTRY_NO_EFFECT:
                self.note(f"{where}.{key}", item, ENTRY_NO_EFFECT[key] or "not needed in ft", False)
            elif item not in (False, "", [], {}):
                self.note(f"{where}.{key}", item, "no ft equivalent", True)
        column = first.get("text_column") or first.get("field") or "text"
        if column != "text":
            out["field"] = column
        out["streaming"] = True
        if kind == "pretrain":
            self.note(f"{where}.type", "pretrain", "ft's completion format: BOS + text + EOS cut into sequence_len "
                      "pieces; axolotl's pretrain tokenizer also overlaps the pieces of a document longer than "
                      "64 x sequence_len tokens by 256 tokens", True, expressed=True)
        self.pretraining = _ordered_entry(out)

    def key_streaming(self, value: Any) -> None:
        self.streamed = bool(value)  # axolotl streams every training dataset: done in finish_streaming

    def key_pretrain_multipack_attn(self, value: Any) -> None:
        if value is False:
            self.note("pretrain_multipack_attn", value, "packed documents that attend to each other are not offered "
                      "(ft's packing keeps each document's attention to itself)", True)

    def key_pretraining_sample_concatenation(self, value: Any) -> None:
        if value:
            self.note("pretraining_sample_concatenation", value, "documents concatenated before cutting (attending "
                      "to each other) are not offered: ft cuts each document on its own", True)

    def finish_streaming(self) -> None:
        """The streamed training set: ``pretraining_dataset`` (axolotl then ignores ``datasets``), or ``streaming:
        true`` on every training entry; a stream needs max_steps."""
        pretraining, streamed = self.pretraining, self.streamed
        if not pretraining and not streamed:
            return
        if not self.data.get("max_steps"):
            from ft.api import FtError

            key = "pretraining_dataset" if pretraining else "streaming"
            raise FtError(f"{self.source or 'the axolotl config'}: {key} streams the training data, which has no "
                          "length to count epochs by: ft (and axolotl) need max_steps. Add max_steps to the axolotl "
                          "config and convert again. Nothing was written.")
        if pretraining:
            if self.core.get("datasets"):
                self.note("datasets", [d.get("path") for d in self.core["datasets"]], "axolotl trains on "
                          "pretraining_dataset when it is set, not on datasets; left out", False)
            self.core["datasets"] = [pretraining]
        elif self.method in (None, "sft"):
            for entry in self.core.get("datasets") or []:
                entry["streaming"] = True
        else:
            self.note("streaming", True, f"ft streams sft data only; method {self.method}'s datasets are read whole "
                      "(same rows)", False)
        if self.core.get("val_set_size"):
            self.note("val_set_size", self.core.pop("val_set_size"), "a stream has no rows to hold out; give an "
                      "evaluation set as test_datasets", False)

    def convert_entries(self, group: str, entries: Any) -> list[dict[str, Any]]:
        out = []
        for i, entry in enumerate(entries or []):
            where = f"{group}[{i}]"
            if not isinstance(entry, dict):
                self.note(where, entry, "not a mapping", True)
                continue
            converted = self.convert_entry(where, entry)
            if converted is not None:
                out.append(converted)
        return out

    def convert_entry(self, where: str, entry: dict[str, Any]) -> dict[str, Any] | None:
        kind = entry.get("type")
        if self.method and self.method != "sft":
            return self.preference_entry(where, entry)
        out: dict[str, Any] = {}
        if isinstance(kind, dict):
            fields = {k: v for k, v in kind.items() if k in ("field_instruction", "field_input", "field_output") and v}
            out["type"] = "alpaca"
            out.update(fields)
            custom = [k for k, v in kind.items() if v and k not in fields]
            if custom:
                self.note(f"{where}.type", {k: kind[k] for k in custom}, "a custom prompt format; ft's alpaca "
                          "format renders the prompt its own way", True, expressed=True)
        elif kind is None:
            self.note(where, entry.get("path"), "no type: axolotl guesses; ft needs `type:` (e.g. chat_template)", True)
            return None
        elif str(kind).startswith("alpaca:") or str(kind) in ("alpaca_chat", "alpaca_w_system"):
            # axolotl's alpaca styles (chat, concise, phi ...) word the prompt differently from ft's alpaca
            out["type"] = "alpaca"
            self.note(f"{where}.type", kind, f"axolotl's '{kind}' prompt style is not offered: ft's alpaca prompt "
                      "(\"Below is an instruction ... ### Response:\") is written instead", True)
        elif str(kind) in SFT_TYPES:
            out["type"] = SFT_TYPES[str(kind)]
            if str(kind).startswith("sharegpt") and "field_messages" not in entry:
                out["field_messages"] = "conversations"
        else:
            self.note(where, f"type: {kind}", f"dataset type '{kind}' is not offered (ft has chat_template, alpaca, "
                      "completion, input_output); the dataset was left out", True)
            return None
        for key, value in entry.items():
            if key == "type" or value is None:
                continue
            if key in ENTRY_SAME:
                out[key] = value
            elif key in ("message_field_role", "message_field_content"):
                mapping = out.setdefault("message_property_mappings", dict(entry.get("message_property_mappings") or {}))
                mapping.setdefault(key[len("message_field_"):], value)
            elif key == "train_on_eot":
                out["train_on_eos"] = value
                if entry.get("train_on_eos") not in (None, value):
                    self.note(f"{where}.train_on_eos", entry["train_on_eos"], "ft's train_on_eos is about the "
                              "end-of-turn token: train_on_eot was used", True, expressed=True)
            elif self.template_or_no_effect(where, key, value, entry, out):
                continue
            elif key in ENTRY_CHANGES:
                self.note(f"{where}.{key}", value, ENTRY_CHANGES[key] or "no ft equivalent", True)
            elif value not in (False, "", [], {}):
                self.note(f"{where}.{key}", value, "no ft equivalent", True)
        if out["type"] == "chat_template" and self.data.get("eot_tokens"):
            out.setdefault("eot_tokens", list(self.data["eot_tokens"]))
        if out["type"] == "chat_template":
            self.drops_system(where, entry, out)
        return _ordered_entry(out)

    # -- rl -> method ----------------------------------------------------------------------------

    def convert_rl(self, rl: Any) -> None:
        data = self.data
        method = RL_METHODS.get(str(rl))
        if method is None:
            from ft.api import FtError

            trl = sorted(data.get("trl") or {})
            raise FtError(f"{self.source or 'the axolotl config'}: rl: {rl} is a training method ft does not offer "
                          f"(ft has {', '.join(sorted(set(RL_METHODS)))})"
                          + (f"; its trl: settings ({', '.join(trl)}) have no ft equivalent either" if trl else "")
                          + ". Nothing was written.")
        self.method = method
        section = self.section(method)
        beta = data.get("rl_beta", (data.get("trl") or {}).get("beta"))
        if method == "dpo":
            if beta is not None:
                section["beta"] = beta
            section["loss_type"] = "ipo" if rl == "ipo" else "sigmoid"
            if data.get("dpo_loss_type"):
                self.note("dpo_loss_type", data["dpo_loss_type"], "one loss_type per run in ft", True)
        elif method == "kto":
            if beta is not None:
                section["beta"] = beta
            for src, dst in (("kto_desirable_weight", "desirable_weight"),
                             ("kto_undesirable_weight", "undesirable_weight")):
                if data.get(src) is not None:
                    section[dst] = data[src]
        elif method == "orpo":
            alpha = data.get("orpo_alpha", beta)
            if alpha is not None:
                section["beta"] = alpha
        elif method == "simpo":
            if beta is not None:
                section["beta"] = beta
            if data.get("simpo_gamma") is not None:
                section["gamma"] = data["simpo_gamma"]
            if data.get("cpo_alpha") is not None:
                section["cpo_alpha"] = data["cpo_alpha"]
        elif method == "grpo":
            self.convert_trl(data.get("trl") or {}, section)
        elif method == "ebft":
            self.convert_ebft(section)
        for key in data:
            if key.startswith(("rl_", "kto_", "orpo_", "simpo_", "cpo_")) and key not in (
                    "rl_beta", "kto_desirable_weight", "kto_undesirable_weight", "orpo_alpha", "simpo_gamma", "cpo_alpha"):
                if data[key] not in (None, False):
                    self.note(key, data[key], "no ft equivalent", True)
        if method not in ONLINE and data.get("trl"):
            for key, value in data["trl"].items():
                if key != "beta" and value not in (None, False):
                    self.note(f"trl.{key}", value, "no ft equivalent for this method", True)

    # -- reward models and process reward models -------------------------------------------------

    def convert_reward_flags(self) -> None:
        """``reward_model: true`` / ``process_reward_model: true`` (no ``rl:``): ft's reward_model / prm method."""
        flags = [key for key in REWARD_FLAGS if self.data.get(key)]
        if not flags:
            return
        self.method = REWARD_FLAGS[flags[0]][0]
        self.section(self.method)
        if len(flags) > 1:
            self.note(flags[1], True, f"axolotl trains with {flags[0]} when both are set; so does ft", False)
        # axolotl cuts each sequence to sequence_len (bradley_terry: each side; stepwise: prompt + steps) and keeps it
        if not self.data.get("excess_length_strategy"):
            self.core["excess_length"] = "truncate"
            self.note("excess_length", "truncate", "axolotl cuts a reward-model sequence longer than sequence_len "
                      "and keeps it: written explicitly (ft also drops a sample the cut leaves with nothing to "
                      "score, e.g. a pair whose sides became identical)", False, expressed=True)

    def key_reward_model(self, value: Any) -> None:
        self._reward_flag("reward_model", value)

    def key_process_reward_model(self, value: Any) -> None:
        self._reward_flag("process_reward_model", value)

    def _reward_flag(self, key: str, value: Any) -> None:
        if value and self.data.get("rl"):
            self.note(key, value, f"axolotl trains rl: {self.data['rl']} when rl is set; so does ft", False)

    def key_center_rewards_coefficient(self, value: Any) -> None:
        if value is None:
            return
        if self.method == "reward_model":
            self.section("reward_model")["center_rewards_coefficient"] = float(value)
        else:
            self.note("center_rewards_coefficient", value, "read with reward_model: true only", False)

    def key_num_labels(self, value: Any) -> None:
        labels = {method: n for method, _, n in REWARD_FLAGS.values()}
        if value is None or labels.get(self.method) == value:
            return  # the method's own head: one score (reward_model) or good/bad per step (prm)
        self.note("num_labels", value, f"ft's reward_model has 1 output and prm 2; {value} labels with "
                  f"{self.method or 'sft'} are not offered", True)

    def stepwise_entry(self, where: str, entry: dict[str, Any]) -> dict[str, Any] | None:
        """A process-reward-model dataset: axolotl's stepwise_supervised is ft's (the same layout)."""
        kind = entry.get("type")
        if kind != "stepwise_supervised":
            self.note(where, f"type: {kind}", "a process reward model trains on type stepwise_supervised (prompt, "
                      "completions, labels); the dataset was left out", True)
            return None
        out: dict[str, Any] = {"path": entry.get("path"), "type": "stepwise_supervised"}
        for key, value in entry.items():
            if key in ("path", "type") or value is None:
                continue
            if key in ("split", "name", "data_files", "revision", "ds_type", "step_separator",
                       "train_on_last_step_only"):
                out[key] = value
            elif key == "max_completion_length":
                self.note(f"{where}.max_completion_length", value, "cutting the steps' tokens is not offered (ft "
                          "cuts the whole sample at sequence_len)", True)
            elif key in ENTRY_NO_EFFECT:
                if value:
                    self.note(f"{where}.{key}", value, ENTRY_NO_EFFECT[key] or "not needed in ft", False)
            elif value not in (False, "", [], {}):
                self.note(f"{where}.{key}", value, "no ft equivalent for stepwise data", True)
        return _ordered_entry(out)

    def key_dpo_label_smoothing(self, value: Any) -> None:
        self._method_key("dpo", "label_smoothing", "dpo_label_smoothing", value)

    def key_precompute_ref_log_probs(self, value: Any) -> None:
        self._method_key("dpo", "precompute_ref_logps", "precompute_ref_log_probs", value)

    def key_max_prompt_len(self, value: Any) -> None:
        self._method_key(("dpo", "kto", "orpo", "simpo"), "max_prompt_len", "max_prompt_len", value)

    def _method_key(self, methods: str | tuple[str, ...], name: str, key: str, value: Any) -> None:
        if value in (None, False):
            return
        if self.method in ((methods,) if isinstance(methods, str) else methods):
            self.section(self.method)[name] = value
        else:
            self.note(key, value, f"applies to {methods if isinstance(methods, str) else '/'.join(methods)} only; "
                      f"this config trains with {self.method or 'sft'}", False)

    def convert_trl(self, trl: dict[str, Any], section: dict[str, Any]) -> None:
        names = {"num_generations": "num_generations", "temperature": "temperature", "top_p": "top_p",
                 "top_k": "top_k", "max_completion_length": "max_completion_len", "beta": "beta",
                 "epsilon": "epsilon", "epsilon_high": "epsilon_high", "loss_type": "loss_type",
                 "num_iterations": "num_iterations", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                 "mask_truncated_completions": "mask_truncated_completions",
                 "vllm_importance_sampling_mode": "is_correction", "vllm_importance_sampling_clip_max": "is_cap",
                 "vllm_importance_sampling_cap": "is_cap", "vllm_importance_sampling_clip_min": "is_min"}
        vllm_names = {"vllm_mode": "mode", "vllm_server_host": "host", "vllm_server_port": "port",
                      "vllm_server_timeout": "server_timeout", "vllm_gpu_memory_utilization": "gpu_memory_utilization",
                      "vllm_tensor_parallel_size": "tensor_parallel_size", "vllm_max_model_len": "max_model_len",
                      "vllm_dtype": "dtype"}
        if self.data.get("rl_beta") is not None:
            section["beta"] = self.data["rl_beta"]
        vllm = dict(self.data.get("vllm") or {}) if isinstance(self.data.get("vllm"), dict) else {}
        for key, value in trl.items():
            if value is None:
                continue
            if key in names:
                section.setdefault(names[key], value)
            elif key == "scale_rewards":  # trl: a boolean (true = by the group's std), or a level
                section["scale_rewards"] = ({True: "group", False: "none"}.get(value, value)
                                            if isinstance(value, bool) else value)
            elif key == "log_completions":
                if value is False:
                    section["log_completions_steps"] = 0  # true: ft's default, every logging_steps
            elif key in ("reward_funcs", "reward_weights", "num_completions_to_print", "chat_template_kwargs"):
                continue  # rewards below; chat_template_kwargs on each prompt dataset (prompt_entry)
            elif key == "vllm_importance_sampling_correction":
                if value is False:
                    section["is_correction"] = "none"
            elif key == "generation_kwargs" and isinstance(value, dict):
                for name, given in value.items():
                    if name in ("stop", "stop_token_ids", "min_p", "repetition_penalty"):
                        section[name] = given
                    else:
                        self.note(f"trl.generation_kwargs.{name}", given, "no ft equivalent", True)
            elif key == "use_vllm":
                if value:
                    self.select("vllm")
                    self.section("vllm")
            elif key in vllm_names:
                self.section("vllm")[vllm_names[key]] = value
            elif key.startswith("vllm"):
                self.note(f"trl.{key}", value, "no ft equivalent (a generation-engine setting)", False)
            elif value is not False:
                self.note(f"trl.{key}", value, "no ft equivalent", True)
        for key in ("host", "port", "gpu_memory_utilization", "tensor_parallel_size", "max_model_len", "dtype"):
            if vllm.get(key) is not None and "vllm" in self.plugins:
                self.section("vllm").setdefault(key, vllm[key])
        if trl.get("use_vllm") and "is_correction" not in section:  # TRL corrects vLLM's sampling by default
            section["is_correction"] = "sequence_mask"
        funcs = trl.get("reward_funcs") or []
        weights = trl.get("reward_weights") or [1.0] * len(funcs)
        if funcs:  # TRL imports "module.function"; ft takes the same function as "module:function"
            section["rewards"] = [{"name": ":".join(str(f).rsplit(".", 1)), "weight": w}
                                  for f, w in zip(funcs, weights, strict=False)]
            self.note("trl.reward_funcs", funcs, "imported by path as module:function, as TRL does: the module must "
                      "be importable where ft runs (installed or on PYTHONPATH), or write file.py:function", False,
                      expressed=True)

    def ebft_options(self) -> dict[str, Any]:
        ebft = self.data.get("ebft")
        return ebft if isinstance(ebft, dict) else {}

    def ebft_strided(self) -> bool:
        return self.ebft_options().get("mode") == "strided"

    def convert_ebft(self, section: dict[str, Any]) -> None:
        """``rl: ebft`` and its ``ebft:`` block: structured mode reads the trl: block as GRPO does; strided mode
        its own keys. axolotl's effective values are written, the reward's scale folded into the coefficients."""
        ebft, trl = self.ebft_options(), self.data.get("trl") or {}
        strided = self.ebft_strided()
        if strided:
            n = int(ebft.get("n_samples_per_prompt", 4))
            section.update(num_generations=n, max_completion_len=int(ebft.get("generate_max_len", 8)),
                           temperature=float(ebft.get("temperature", 0.6)), top_p=float(ebft.get("top_p", 1.0)))
            for key, value in trl.items():
                if value not in (None, False):
                    self.note(f"trl.{key}", value, "axolotl's strided EBFT does not read the trl: block", False)
        else:
            self.convert_trl(trl, section)
            n = int(section.get("num_generations", 8))  # TRL's default group size, as ft's
        layers = list(ebft.get("feature_layers", [0.25, 0.5, 0.75]))
        section["layers"] = layers
        self.note("ebft.feature_layers", layers, "axolotl takes hidden state int(f x layers), ft round(f x layers) "
                  "(at least 1): the same where f x layers is whole, e.g. 0.25/0.5/0.75 of a layer count divisible "
                  "by 4", True, expressed=True)
        if not strided:  # axolotl's structured mode normalises (or whitens) the concatenated layers as one vector
            section["normalization"] = "joint"
        whitening = bool(ebft.get("use_whitening"))
        if whitening:
            section["whitening"] = True
        embed = ebft.get("embed_method", "last_token")
        if embed == "last_token" or embed == "completion_mean" or (embed == "mean_pooling" and strided):
            section["pooling"] = "last_token" if embed == "last_token" else "mean"  # over the completion's tokens
            if strided and embed == "mean_pooling":
                self.note("ebft.embed_method", embed, "axolotl's strided mode averages the per-token normalised "
                          "hidden states; ft normalises the average of each layer's hidden states", True)
        elif embed == "mean_pooling":
            section["pooling"] = "mean"
            self.note("ebft.embed_method", embed, "axolotl's structured mean_pooling averages over the prompt's "
                      "tokens too; ft's mean averages the completion's (axolotl's completion_mean)", True)
        else:
            self.note("ebft.embed_method", embed, "not offered (ft pools at the last token or by the mean)", True)
        # the reward axolotl computes, as ft's coefficients: the paper's factor 2 on both terms; in strided mode
        # the diversity is a dot product of per-layer-normalised features (norm^2 = the layer count), and RLOO's
        # advantage r - mean(others) is the group-mean advantage times n/(n-1)
        align, diverse, why = 2.0, 2.0, ["the paper's factor 2 on both terms"]
        if strided:
            if not whitening:  # whitened features do not depend on the scale of the features they came from
                diverse *= len(layers)
                why.append(f"the diversity is a dot product of per-layer-normalised features ({len(layers)} layers)")
            estimator = ebft.get("advantage_estimator", "rloo")
            rl_coef = float(ebft.get("rl_coef", 1.0))
            if estimator == "rloo" and n > 1:
                section["scale_rewards"] = "none"
                align, diverse = align * n / (n - 1), diverse * n / (n - 1)
                why.append(f"RLOO's advantage is the group-mean one times n/(n-1) = {n}/{n - 1}")
            elif estimator == "group_norm":
                section["scale_rewards"] = "group"
            else:
                self.note("ebft.advantage_estimator", estimator, "advantages without a baseline are not offered "
                          "(ft subtracts the group's mean)", True)
            if rl_coef != 1.0:
                if section.get("scale_rewards") == "none":
                    align, diverse = align * rl_coef, diverse * rl_coef
                    why.append(f"rl_coef {rl_coef} scales the advantages")
                else:
                    self.note("ebft.rl_coef", rl_coef, "a weight on the policy loss is not offered", True)
            section["loss_type"] = "bnpo"
            self.note("ebft.mode", "strided", "axolotl's strided loss is REINFORCE averaged over the micro-batch's "
                      "generated tokens: ft's bnpo (the same with one optimizer step per batch)", False,
                      expressed=True)
            if ebft.get("min_completion_prefix"):
                self.note("ebft.min_completion_prefix", ebft["min_completion_prefix"], "not offered (ft's first "
                          "anchor is `stride` tokens into the document)", True)
        section["alignment_coef"] = float(ebft.get("alignment_coef", 1.0)) * align
        section["diversity_coef"] = float(ebft.get("diversity_coef", 1.0)) * diverse
        self.note("ebft.alignment_coef", ebft.get("alignment_coef", 1.0), "axolotl's reward scale folded into ft's "
                  "coefficients: " + "; ".join(why), False, expressed=True)
        if ebft.get("ce_coef"):
            self.note("ebft.ce_coef", ebft["ce_coef"], "a cross-entropy term on the reference is not offered", True)
        vllm = trl.get("use_vllm") and not strided
        if vllm and ebft.get("adaptive_max_tokens", True):
            self.note("ebft.adaptive_max_tokens", True, f"axolotl (with vLLM) caps a batch's completions at "
                      f"{ebft.get('gt_length_multiplier', 1.5)} x its longest reference (at least 64 tokens); ft "
                      "generates up to max_completion_len", True)
        handled = {"mode", "feature_layers", "embed_method", "use_whitening", "alignment_coef", "diversity_coef",
                   "ce_coef", "adaptive_max_tokens", "gt_length_multiplier"}
        strided_keys = {"stride", "context_length", "generate_max_len", "n_samples_per_prompt", "temperature",
                        "top_p", "rl_coef", "advantage_estimator", "min_completion_prefix"}
        for key, value in ebft.items():
            if key in handled or value is None:
                continue
            if key in strided_keys:
                if not strided:
                    self.note(f"ebft.{key}", value, "read in axolotl's strided mode only", False)
            elif value is not False:
                self.note(f"ebft.{key}", value, "no ft equivalent", True)

    def ebft_entry(self, where: str, entry: dict[str, Any]) -> dict[str, Any] | None:
        """An EBFT dataset: prompt + reference rows (structured mode) or raw documents (strided mode)."""
        kind = str(entry.get("type") or "")
        out: dict[str, Any] = {"path": entry.get("path")}
        for key in ("split", "name", "data_files", "revision", "ds_type"):
            if entry.get(key) is not None:
                out[key] = entry[key]
        if self.ebft_strided():
            if kind.startswith(EBFT_STRIDED_SPANS):
                self.note(where, f"type: {kind}", "anchors inside the completions of prompt/completion rows or "
                          "chats are not offered (ft's strided type reads raw documents); the dataset was left out",
                          True)
                return None
            ebft = self.ebft_options()
            out.update(type="strided", stride=int(ebft.get("stride", 8)), context_len=int(ebft.get("context_length", 8)))
            self.note(f"{where}.type", kind or None, "axolotl's transform (a Python module) is not run: ft reads each "
                      "raw document from `text` (datasets[].field) and places anchors over the whole document "
                      "(axolotl's ebft_pretrain example reads `question` or `text` and cuts the document at "
                      "sequence_len)", True)
        else:
            out["type"] = "prompt_reference"
            if kind in EBFT_STRUCTURED:
                out.update(EBFT_STRUCTURED[kind], apply_chat_template=True)
                self.note(f"{where}.type", kind, "axolotl's transform as ft's prompt_reference fields (the prompt "
                          "a user message rendered with the chat template)", False, expressed=True)
            else:
                out["field_reference"] = "ground_truth"
                if kind:
                    self.note(f"{where}.type", kind, "axolotl's transform (a Python function) is not run: ft reads "
                              "the prompt (chat messages or text) from `prompt` and the reference from "
                              "`ground_truth`, the columns axolotl's transforms make; prepare the rows that way", True)
            template_kwargs = (self.data.get("trl") or {}).get("chat_template_kwargs")
            if isinstance(template_kwargs, dict) and template_kwargs:
                out["chat_template_kwargs"] = dict(template_kwargs)
        for key, value in entry.items():
            if key in ("path", "type", "split", "name", "data_files", "revision", "ds_type") or value in (
                    None, False, "", [], {}):
                continue
            if key == "field_prompt" and out["type"] == "prompt_reference":
                out["field_prompt"] = value
            else:
                self.note(f"{where}.{key}", value, "no ft equivalent for EBFT data", True)
        return _ordered_entry(out)

    def template_or_no_effect(self, where: str, key: str, value: Any, entry: dict[str, Any],
                              out: dict[str, Any]) -> bool:
        """A dataset entry's chat template keys, and keys without effect in ft, the same for every data type:
        True when ``key`` was one of them (and is handled)."""
        if key in ("chat_template", "conversation"):
            ok, spec = self.template(f"{where}.{key}", value, entry.get("chat_template_jinja"))
            if ok and spec is not None:
                out["chat_template"] = spec
        elif key == "chat_template_jinja":
            if not entry.get("chat_template"):
                out["chat_template"] = value
        elif key in ENTRY_NO_EFFECT:
            if value:
                self.note(f"{where}.{key}", value, ENTRY_NO_EFFECT[key] or "not needed in ft", False)
        else:
            return False
        return True

    def prompt_entry(self, where: str, entry: dict[str, Any]) -> dict[str, Any]:
        """A GRPO dataset: prompts for generation (axolotl's `type:` names a transform module of the user's)."""
        out: dict[str, Any] = {"path": entry.get("path"), "type": "prompt"}
        for key in ("split", "name", "data_files", "revision", "ds_type", "field_prompt", "chat_template"):
            if entry.get(key) is not None:
                out[key] = entry[key]
        template_kwargs = (self.data.get("trl") or {}).get("chat_template_kwargs")
        if isinstance(template_kwargs, dict) and template_kwargs:  # e.g. enable_thinking: false
            out["chat_template_kwargs"] = dict(template_kwargs)
        if entry.get("type"):
            self.note(f"{where}.type", entry["type"], "axolotl's GRPO transform (a Python function of yours) is not "
                      "run: ft reads the prompt from field_prompt (default: prompt) as chat messages or text; "
                      "prepare the rows that way", True)
        return out

    def preference_entry(self, where: str, entry: dict[str, Any]) -> dict[str, Any] | None:
        if self.method == "grpo":
            return self.prompt_entry(where, entry)
        if self.method == "ebft":
            return self.ebft_entry(where, entry)
        if self.method == "prm":
            return self.stepwise_entry(where, entry)
        kind = entry.get("type")
        out: dict[str, Any] = {"path": entry.get("path"), "type": "kto" if self.method == "kto" else "preference"}
        for key in ("split", "name", "data_files", "revision", "ds_type"):
            if entry.get(key) is not None:
                out[key] = entry[key]
        fields: dict[str, str] = {}
        template = None
        if isinstance(kind, dict):
            fields = {k: v for k, v in kind.items() if k.startswith("field_") and v}
            if any(k.endswith("_format") and v for k, v in kind.items()):
                self.note(f"{where}.type", kind, "custom prompt formats are not offered; the chat template renders",
                          True, expressed=True)
        elif isinstance(kind, str):
            prefix, _, variant = kind.partition(".")
            template = {"chatml": "chatml", "llama3": "llama3", "zephyr": None}.get(prefix)
            if self.method == "orpo" and prefix == "chat_template" and variant == "argilla":
                variant = "argilla_chat"  # ORPO's chat_template.argilla reads whole conversations (DPO's: texts)
            fields = dict(PREFERENCE_TYPES.get(variant, {}))
            if kind == "bradley_terry.chat_template":
                fields = dict(BRADLEY_TERRY)
                self.note(f"{where}.type", kind, "became ft's 'preference' type reading the same columns (system, "
                          "input, chosen, rejected), each side rendered with the chat template", False, expressed=True)
            elif variant not in PREFERENCE_TYPES and prefix != "chat_template":
                self.note(f"{where}.type", kind, "field names guessed (prompt, chosen, rejected): check them against "
                          "your data", True, expressed=True)
            else:
                self.note(f"{where}.type", kind, f"became ft's '{out['type']}' type with this dataset's fields; check "
                          "them against `ft plugins` (the preference formats)", False, expressed=True)
        for key in ("field_messages", "field_chosen", "field_rejected", "field_prompt", "field_system"):
            if entry.get(key):
                fields[key] = entry[key]
        if "field_messages" in fields:  # axolotl's chat_template.default: the prompt's messages
            fields.setdefault("field_prompt", fields.pop("field_messages"))
            fields.pop("field_messages", None)
        if fields.get("field_prompt") is None and "field_chosen" in fields and variant_is_conversation(kind):
            # the prompt is the messages both conversations share (axolotl takes it from `chosen`); a `prompt`
            # column, which such datasets often carry as text, must not be read as an extra prompt
            fields["field_prompt"] = NO_PROMPT_FIELD
        if self.method == "kto":
            fields = {k: v for k, v in fields.items() if k not in ("field_chosen", "field_rejected")}
        out.update(fields)
        if template:
            out["chat_template"] = template
        handled = {"path", "type", "split", "name", "data_files", "revision", "ds_type", "field_messages",
                   "field_chosen", "field_rejected", "field_prompt", "field_system"}
        for key, value in entry.items():  # the chat options ft's preference types share with chat_template
            if key in handled or value is None:
                continue
            if key in PREFERENCE_SAME:
                out[key] = value
            elif self.template_or_no_effect(where, key, value, entry, out):
                continue
            elif value not in (False, "", [], {}):
                self.note(f"{where}.{key}", value, ENTRY_CHANGES.get(key) or "no ft equivalent for preference data",
                          True)
        self.drops_system(where, entry, out)
        return _ordered_entry(out)

    def drops_system(self, where: str, entry: dict[str, Any], out: dict[str, Any]) -> None:
        """axolotl's mistral_v2v3/v3_tekken templates drop a system message: say so on the entry."""
        name = entry.get("chat_template") or entry.get("conversation") or self.data.get("chat_template")
        if name in TEMPLATE_DROPS_SYSTEM and "drop_system_message" not in entry:
            out["drop_system_message"] = True
            self.note(f"{where}.drop_system_message", True, f"axolotl's {name} template leaves a system message out "
                      "(ft's folds it into the first user turn): written explicitly", False, expressed=True)


def variant_is_conversation(kind: Any) -> bool:
    """Preference types whose chosen/rejected are whole conversations (the prompt is their shared start)."""
    return isinstance(kind, str) and kind.partition(".")[2] in ("argilla_chat", "argilla") and \
        kind.startswith("chat_template")


def _section_order(name: str) -> tuple[int, str]:
    order = ["lora", "qlora", "dpo", "kto", "orpo", "simpo", "grpo", "ebft", "reward_model", "hf", "liger", "compile", "fsdp", "deepspeed",
             "wandb", "hub"]
    return (order.index(name) if name in order else len(order), name)


def _ordered_entry(entry: dict[str, Any]) -> dict[str, Any]:
    first = [k for k in ("path", "type", "split", "name", "ds_type", "data_files") if k in entry]
    return {**{k: entry[k] for k in first}, **{k: v for k, v in entry.items() if k not in first}}


def convert(data: dict[str, Any], source: str | None = None) -> Conversion:
    """An axolotl config (parsed YAML) as an ft config, with notes about what did not carry over."""
    from ft.api import FtError

    if not isinstance(data, dict):
        raise FtError(f"{source or 'the axolotl config'}: the top level must be a mapping of keys to values.")
    if not data.get("base_model"):
        raise FtError(f"{source or 'the axolotl config'}: has no base_model, so it is not an axolotl training config.")
    converter = _Converter(data)
    converter.source = source
    return converter.run()


# -- hints for axolotl keys in an ft config --------------------------------------------------------


def _adapter_hint(value: Any) -> str:
    if value == "qlora":
        return "axolotl's `adapter: qlora` is `plugins: [lora, qlora]` in ft (qlora: {bits: 4} sets the bits)."
    return "axolotl's `adapter: lora` is `plugins: [lora]` in ft, with the settings in a `lora:` section."


# Hints for axolotl keys met in an ft config. A key the converter maps through one of the tables above gets
# its hint from that table (one source: a key added there is hinted too); a key it converts in code has its
# hint here. HINT_MORE: what a derived hint adds before its full stop.
HINT_MORE = {"lora_r": " (and select the plugin: plugins: [lora])", "lora_model_dir": " to continue from an adapter",
             "sdp_attention": " (the default)",
             "liger_rope": " (its `liger:` section turns single kernels off)"}
HAND_HINTS: dict[str, str | Callable[[Any], str]] = {
    "adapter": _adapter_hint,
    "lora_target_linear": "write `target_modules: all-linear` in the `lora:` section.",
    "load_in_4bit": "write `plugins: [lora, qlora]` (4 bits is the qlora default).",
    "load_in_8bit": "write `plugins: [lora, qlora]` and `qlora: {bits: 8}`.",
    "bnb_config_kwargs": "write quant_type / double_quant / compute_dtype in the `qlora:` section.",
    "sample_packing": "write `plugins: [packing]`.",
    "attn_implementation": "write it in the `hf:` section: hf: {attn_implementation: ...}.",
    "trust_remote_code": "write `hf: {trust_remote_code: true}`.",
    "torch_compile": "write `plugins: [compile]` (its `compile:` section has mode and backend).",
    "torch_compile_backend": "write `backend:` in the `compile:` section.",
    "torch_compile_mode": "write `mode:` in the `compile:` section.",
    "fsdp_config": "write `plugins: [fsdp]` with an `fsdp:` section (wrap_layers, offload_params ...).",
    "fsdp_version": "ft's fsdp plugin is FSDP2; write `plugins: [fsdp]`.",
    "use_wandb": "write `report_to: wandb`.", "use_tensorboard": "write `report_to: tensorboard`.",
    "use_mlflow": "write `report_to: mlflow`.",
    "hub_model_id": "write `hub: {model_id: ...}`.", "hub_strategy": "write `strategy:` in the `hub:` section.",
    "hub_private_repo": "write `private:` in the `hub:` section.",
    "center_rewards_coefficient": "write `method: reward_model` with `reward_model: {center_rewards_coefficient: ...}`.",
    "num_labels": "methods reward_model (1 output) and prm (2) load their head themselves; remove it.",
    "rl_beta": "write `beta:` in the method's section (e.g. dpo: {beta: 0.1}).",
    "excess_length_strategy": "write `excess_length:` (drop, truncate or error).",
    "chat_template_jinja": "write the jinja (or a .jinja file) as `chat_template:`.",
    "eot_tokens": "write `eot_tokens:` on each chat_template dataset entry.",
    "batch_size": "write gradient_accumulation_steps (batch_size / micro_batch_size).",
    "base_model_config": "ft reads the model config from base_model; remove it.",
    "model_type": "ft loads AutoModelForCausalLM; remove it.", "tokenizer_type": "ft loads AutoTokenizer; remove it.",
    "datasets[].conversation": "write the template name as `chat_template:` on the entry.",
    "datasets[].message_field_role": "write `message_property_mappings: {role: ...}`.",
    "datasets[].message_field_content": "write `message_property_mappings: {content: ...}`.",
    "datasets[].train_on_eot": "write `train_on_eos:` (in ft it is about the end-of-turn token).",
    "datasets[].chat_template_jinja": "write the jinja (or a .jinja file) as `chat_template:`.",
}


def key_hints() -> dict[str, str | Callable[[Any], str]]:
    """Every hint: those derived from the converter's tables, then the hand-written ones."""
    derived = {}
    for key, name in LORA_KEYS.items():
        derived[key] = f"write `{name}{': true' if name.startswith('use_') else ':'}` in the `lora:` section"
    for key, impl in ATTENTION.items():
        derived[key] = f"write `hf: {{attn_implementation: {impl}}}`"
    for key in LIGER_KEYS:
        derived[key] = "write `plugins: [liger]`"
    for key, name in RENAMED_CORE.items():
        derived[key] = f"write `{name}:`"
    for key in WANDB_KEYS:
        derived[key] = f"write `{key[len('wandb_'):]}:` in the `wandb:` section"
    derived["wandb_project"] = "write `report_to: wandb` and `wandb: {project: ...}`"
    methods = ", ".join(dict.fromkeys(RL_METHODS.values()))
    derived["rl"] = f"write `method:` ({methods}) with the method's section"
    prm = REWARD_FLAGS["process_reward_model"][0]
    derived["process_reward_model"] = f"write `method: {prm}` (a process reward model, data type stepwise_supervised)"
    hints: dict[str, str | Callable[[Any], str]] = {k: f"{v}{HINT_MORE.get(k, '')}." for k, v in derived.items()}
    return {**hints, **HAND_HINTS}


CONVERT_TIP = " `ft convert axolotl.yml -o ft.yaml` translates a whole axolotl config."


def _with_tip(hint: str | Callable[[Any], str]) -> Callable[[Any], str]:
    def text(value: Any) -> str:
        return (hint(value) if callable(hint) else f"This is axolotl's key: {hint}") + CONVERT_TIP

    return text


@hookimpl
def ft_register_key_hints(register):
    for key, hint in key_hints().items():
        register.add(key, _with_tip(hint))


# -- the command -----------------------------------------------------------------------------------


@hookimpl
def ft_add_commands(cli):
    import click

    from ft.api import handle_errors

    @cli.command("convert")
    @click.argument("source", type=click.Path(dir_okay=False, exists=True))
    @click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
                  help="Write the ft config here (default: print it).")
    @click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
    @handle_errors
    def convert_command(source, output, force):
        """Convert an axolotl config to an ft config.

        Keys ft cannot express are listed in a comment at the top of the output. Exits with status 3
        when one of them changes what is trained (the config is still written), else 0.
        """
        import sys

        from ft.api import read_yaml

        if output:
            check_output(Path(source), Path(output), force)
        raw = read_yaml(source)
        result = convert(raw.data, source)
        text = result.to_yaml(source)
        if output:
            out = Path(output)
            write_output(out, text)
            click.echo(f"wrote {out}", err=True)
        else:
            click.echo(text, nl=False)
        dropped = result.dropped_training
        others = [n for n in result.notes if not n.changes_training and not n.expressed]
        if others:
            click.echo(f"{len(others)} key(s) not needed in ft (listed at the top of the output).", err=True)
        if dropped:
            click.secho(f"{len(dropped)} key(s) that change training could not be expressed: "
                        + ", ".join(n.key for n in dropped) + ". Review the comment at the top of the output.",
                        fg="yellow", err=True)
            sys.exit(EXIT_DROPPED_TRAINING)
        if output:
            click.echo(f"check it: ft validate {output}", err=True)


def check_output(source: Path, out: Path, force: bool) -> None:
    """Refuse an ``-o`` that is the input (itself, a symlink or a hard link to it), one that exists without
    ``--force``, and one whose folder does not exist (created for nobody: a typo in the folder would go unseen)."""
    from ft.api import FtError

    if out.exists() and os.path.samefile(out, source):
        same = "a link to " if out.is_symlink() or out.resolve() != source.resolve() else ""
        raise FtError(f"-o {out} is {same}the input {source}: converting would replace the axolotl config it reads, "
                      "even with --force. Write the ft config to another file.")
    if out.exists() and not force:
        raise FtError(f"{out} exists; pass --force to replace it (or choose another -o).")
    folder = out.resolve().parent if out.is_symlink() else out.absolute().parent
    if not folder.is_dir():
        raise FtError(f"-o {out}: the folder {folder} does not exist. Create it first (mkdir -p {folder}) or choose "
                      "another -o.")


def write_output(out: Path, text: str) -> None:
    """Write ``text`` whole or not at all (a temporary file beside the target, then renamed over it); an ``-o``
    that is a symlink is written through."""
    import tempfile

    from ft.api import FtError

    target = out.resolve()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~umask)  # not mkstemp's 0600
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise FtError(f"could not write {out}: {exc.strerror or exc}.") from None


@functools.cache
def _registries() -> Any:
    from ft.api import collect_registries, make_plugin_manager

    return collect_registries(make_plugin_manager())


def registered_names(kind: str) -> frozenset[str]:
    """Names the installed plugins register as ``kind`` (``optimizers``, ``schedulers``)."""
    return frozenset(getattr(_registries(), kind).names())
