"""Coming from axolotl: `ft convert` turns configs in the shapes of axolotl's examples into ft configs
that `ft validate` accepts, says what it could not express, and axolotl keys in ft configs get hints.

The axolotl configs here are written for these tests in the shapes axolotl's published examples use
(LoRA, QLoRA, full fine-tune, chat_template with field mappings, alpaca, 8-bit, FSDP, DPO): the keys
and value kinds users have in their files, not copies of those files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ft.tools.tiny import make_chat_rows, write_jsonl

LORA = """
base_model: {base}
load_in_8bit: false
load_in_4bit: false
datasets:
  - path: {data}
    type: chat_template
    field_messages: messages
dataset_prepared_path: last_run_prepared
val_set_size: 0.1
output_dir: ./outputs/lora-out
adapter: lora
lora_model_dir:
sequence_len: 2048
sample_packing: true
eval_sample_packing: false
pad_to_sequence_len: true
lora_r: 16
lora_alpha: 32
lora_dropout: 0.05
lora_fan_in_fan_out:
lora_target_linear: true
wandb_project: chat-lora
wandb_entity:
wandb_watch:
wandb_name: run-7
wandb_log_model:
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 1
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 2e-4
bf16: auto
tf32: false
gradient_checkpointing: true
resume_from_checkpoint:
logging_steps: 1
flash_attention: true
warmup_ratio: 0.1
evals_per_epoch: 4
saves_per_epoch: 1
weight_decay: 0.0
special_tokens:
  pad_token: <|endoftext|>
"""

QLORA = """
base_model: {base}
model_type: AutoModelForCausalLM
tokenizer_type: AutoTokenizer
load_in_8bit: false
load_in_4bit: true
strict: false
datasets:
  - path: {data}
    type: alpaca
dataset_prepared_path:
val_set_size: 0.05
output_dir: ./outputs/qlora-out
adapter: qlora
lora_model_dir:
sequence_len: 4096
sample_packing: true
pad_to_sequence_len: true
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules:
  - q_proj
  - v_proj
  - k_proj
  - o_proj
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 4
optimizer: paged_adamw_32bit
lr_scheduler: cosine
learning_rate: 0.0002
train_on_inputs: false
group_by_length: false
bf16: auto
gradient_checkpointing: true
logging_steps: 1
xformers_attention:
flash_attention: true
warmup_steps: 10
evals_per_epoch: 4
eval_table_size:
saves_per_epoch: 1
debug:
deepspeed:
weight_decay: 0.0
fsdp:
fsdp_config:
special_tokens:
"""

FULL = """
base_model: {base}
datasets:
  - path: {data}
    type: completion
    field: text
dataset_prepared_path: ./prepared
val_set_size: 0.0
output_dir: ./outputs/full
sequence_len: 1024
sample_packing: true
gradient_accumulation_steps: 8
micro_batch_size: 1
num_epochs: 3
optimizer: adamw_torch_fused
lr_scheduler: cosine
learning_rate: 1e-5
cosine_min_lr_ratio: 0.1
bf16: true
tf32: true
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
logging_steps: 1
sdp_attention: true
warmup_steps: 100
saves_per_epoch: 1
save_total_limit: 2
weight_decay: 0.01
use_tensorboard: true
torch_compile: true
"""

CHAT_MAPPINGS = """
base_model: {base}
chat_template: chatml
datasets:
  - path: {data}
    type: chat_template
    field_messages: conversations
    message_property_mappings:
      role: from
      content: value
    roles:
      user: ["human"]
      assistant: ["gpt"]
      system: ["system"]
    roles_to_train: ["assistant"]
    train_on_eos: turn
    split: train
    ds_type: json
dataset_prepared_path: {prepared}
val_set_size: 0
output_dir: {out}
sequence_len: 512
micro_batch_size: 2
gradient_accumulation_steps: 1
num_epochs: 1
learning_rate: 0.0001
eot_tokens:
  - <|im_end|>
"""

ALPACA = """
base_model: {base}
tokenizer_config: {base}
datasets:
  - path: {data}
    type: alpaca
    name: default
shuffle_merged_datasets: true
dataset_processes: 2
val_set_size: 20
output_dir: ./outputs/alpaca
sequence_len: 512
micro_batch_size: 4
gradient_accumulation_steps: 2
num_epochs: 2
learning_rate: 0.00003
optimizer: adamw_torch
lr_scheduler: linear
eval_steps: 50
save_steps: 100
early_stopping_patience: 3
load_best_model_at_end: true
excess_length_strategy: truncate
"""

EIGHT_BIT = """
base_model: {base}
load_in_8bit: true
adapter: lora
lora_r: 8
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules: [q_proj, v_proj]
datasets:
  - path: {data}
    type: chat_template
output_dir: ./outputs/lora-8bit
sequence_len: 1024
micro_batch_size: 2
gradient_accumulation_steps: 4
num_epochs: 1
learning_rate: 0.0002
optimizer: adamw_8bit
"""

FSDP = """
base_model: {base}
datasets:
  - path: {data}
    type: chat_template
output_dir: ./outputs/fsdp
sequence_len: 2048
micro_batch_size: 1
gradient_accumulation_steps: 1
num_epochs: 1
learning_rate: 2e-5
bf16: auto
fsdp:
  - full_shard
  - auto_wrap
fsdp_config:
  fsdp_version: 2
  fsdp_offload_params: false
  fsdp_cpu_ram_efficient_loading: true
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_activation_checkpointing: true
hub_model_id: someone/fsdp-run
hub_strategy: every_save
"""

DPO = """
base_model: {base}
rl: dpo
rl_beta: 0.1
chat_template: llama3
datasets:
  - path: {data}
    split: train
    type: chatml.intel
adapter: lora
lora_r: 16
lora_alpha: 32
lora_target_linear: true
output_dir: ./outputs/dpo
sequence_len: 1024
micro_batch_size: 1
gradient_accumulation_steps: 8
num_epochs: 1
learning_rate: 5e-6
"""

SHAPES = {"lora": LORA, "qlora": QLORA, "full": FULL, "chat_mappings": CHAT_MAPPINGS, "alpaca": ALPACA,
          "eight_bit": EIGHT_BIT, "fsdp": FSDP, "dpo": DPO}
NEEDS = {"qlora": "bitsandbytes", "eight_bit": "bitsandbytes"}


@pytest.fixture
def axolotl_config(tmp_path, ft_tiny_model_dir):
    def write(shape: str) -> tuple:
        data = write_jsonl(tmp_path / "data.jsonl", make_chat_rows(8))
        text = SHAPES[shape].format(base=ft_tiny_model_dir, data=data, prepared=tmp_path / "prepared",
                                    out=tmp_path / "out")
        src = tmp_path / f"{shape}.yml"
        src.write_text(text)
        return src, tmp_path / f"{shape}.ft.yaml"

    return write


def convert(ft_runner, src, out):
    return ft_runner.invoke("convert", str(src), "-o", str(out))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_each_axolotl_shape_converts_and_validates(shape, axolotl_config, ft_runner, monkeypatch):
    from ft_plugins import hf

    import ft.kernel.config_checks

    real = ft.kernel.config_checks._importable  # the LoRA shape reports to W&B; validation checks that wandb is installed
    monkeypatch.setattr(ft.kernel.config_checks, "_importable", lambda m: True if m == "wandb" else real(m))
    # the shapes are written for a GPU machine (bf16, flash attention); those checks have their own tests
    monkeypatch.setattr(hf, "_has_cuda", lambda: True)
    monkeypatch.setattr(hf, "attention_problems", lambda cfg: [])
    if shape in NEEDS:
        pytest.importorskip(NEEDS[shape])
    src, out = axolotl_config(shape)
    result = convert(ft_runner, src, out)
    assert result.exit_code in (0, 3), result.output
    assert out.is_file()
    ft_runner.validate(out).assert_ok()


def converted(ft_runner, axolotl_config, shape):
    src, out = axolotl_config(shape)
    result = convert(ft_runner, src, out)
    return result, yaml.safe_load(out.read_text()), out.read_text()


def test_lora_shape(ft_runner, axolotl_config):
    result, cfg, text = converted(ft_runner, axolotl_config, "lora")
    assert cfg["plugins"] == ["lora", "packing"]
    assert cfg["lora"] == {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
    assert cfg["hf"] == {"attn_implementation": "flash_attention_2"}
    assert cfg["learning_rate"] == 2e-4  # axolotl's 2e-4 is text in YAML; ft wants the number
    assert (cfg["evals_per_epoch"], cfg["saves_per_epoch"], cfg["eval_sample_packing"]) == (4, 1, False)
    assert cfg["report_to"] == ["wandb"] and cfg["wandb"] == {"project": "chat-lora", "name": "run-7"}
    assert cfg["optimizer"] == "adamw_bnb_8bit" and cfg["special_tokens"] == {"pad_token": "<|endoftext|>"}
    assert "pad_to_sequence_len: True  -- ft pads each batch" in text
    assert result.exit_code == 0  # nothing that changes training was dropped


def test_qlora_shape(ft_runner, axolotl_config):
    result, cfg, text = converted(ft_runner, axolotl_config, "qlora")
    assert cfg["plugins"] == ["lora", "qlora", "packing"]
    assert cfg["qlora"] == {"bits": 4}
    assert cfg["lora"]["target_modules"] == ["q_proj", "v_proj", "k_proj", "o_proj"]
    assert cfg["optimizer"] == "paged_adamw_32bit" and cfg["num_epochs"] == 4
    assert "strict: False  --" not in text  # false/empty keys are what ft does anyway: nothing to say
    assert result.exit_code == 0


def test_full_finetune_shape_with_compile_and_tensorboard(ft_runner, axolotl_config):
    _, cfg, _ = converted(ft_runner, axolotl_config, "full")
    assert cfg["plugins"] == ["packing", "compile"]
    assert cfg["datasets"][0] == {"path": cfg["datasets"][0]["path"], "type": "completion", "field": "text"}
    assert cfg["cosine_min_lr_ratio"] == 0.1 and cfg["report_to"] == ["tensorboard"]
    assert cfg["hf"] == {"attn_implementation": "sdpa"} and "lora" not in cfg


def test_alpaca_shape(ft_runner, axolotl_config, ft_tiny_model_dir):
    _, cfg, _ = converted(ft_runner, axolotl_config, "alpaca")
    assert cfg["tokenizer"] == str(ft_tiny_model_dir) and cfg["dataset_num_proc"] == 2 and cfg["shuffle"] is True
    assert cfg["datasets"][0]["name"] == "default" and cfg["excess_length"] == "truncate"
    assert (cfg["eval_steps"], cfg["save_steps"], cfg["early_stopping_patience"], cfg["load_best_model_at_end"]) == \
        (50, 100, 3, True)


def test_eight_bit_and_fsdp_shapes(ft_runner, axolotl_config):
    _, cfg, _ = converted(ft_runner, axolotl_config, "eight_bit")
    assert cfg["plugins"] == ["lora", "qlora"] and cfg["qlora"] == {"bits": 8}
    assert cfg["lora"]["target_modules"] == ["q_proj", "v_proj"]
    _, cfg, _ = converted(ft_runner, axolotl_config, "fsdp")
    assert cfg["plugins"] == ["fsdp"]
    assert cfg["fsdp"] == {"wrap_layers": ["LlamaDecoderLayer"], "offload_params": False,
                           "activation_checkpointing": True, "save": "full"}
    assert cfg["hub"] == {"model_id": "someone/fsdp-run", "strategy": "every_save"}


def test_dpo_shape_becomes_a_method_with_its_section(ft_runner, axolotl_config):
    _, cfg, text = converted(ft_runner, axolotl_config, "dpo")
    assert cfg["method"] == "dpo" and cfg["dpo"] == {"beta": 0.1, "loss_type": "sigmoid"}
    entry = cfg["datasets"][0]
    assert entry["type"] == "preference" and entry["field_prompt"] == "question"
    assert (entry["field_chosen"], entry["field_rejected"], entry["chat_template"]) == ("chosen", "rejected", "chatml")
    assert "chatml.intel" in text  # the comment says what became of the dataset type


def test_liger_plugin_and_its_keys():
    from ft_plugins.axolotl import convert as convert_data

    result = convert_data({"base_model": "m", "datasets": [{"path": "p.jsonl", "type": "alpaca"}],
                           "plugins": ["axolotl.integrations.liger.LigerPlugin"], "liger_rope": True,
                           "liger_rms_norm": True, "liger_glu_activation": False,
                           "liger_fused_linear_cross_entropy": True, "warmup_steps": 0})
    assert result.config["plugins"] == ["liger"]
    assert result.config["liger"] == {"rope": True, "rms_norm": True, "swiglu": False,
                                      "fused_linear_cross_entropy": True}
    assert not result.notes


@pytest.mark.parametrize(("rl", "extra", "method", "section"), [
    ("ipo", {"rl_beta": 0.2}, "dpo", {"beta": 0.2, "loss_type": "ipo"}),
    ("kto", {"rl_beta": 0.1, "kto_desirable_weight": 1.0, "kto_undesirable_weight": 1.5}, "kto",
     {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.5}),
    ("orpo", {"orpo_alpha": 0.1}, "orpo", {"beta": 0.1}),
    ("simpo", {"rl_beta": 2.0, "simpo_gamma": 0.5, "cpo_alpha": 0.0}, "simpo",
     {"beta": 2.0, "gamma": 0.5, "cpo_alpha": 0.0}),
    ("grpo", {"trl": {"beta": 0.04, "num_generations": 4, "max_completion_length": 128, "temperature": 0.9,
                      "reward_funcs": ["rewards.correct", "rewards.format"], "reward_weights": [1.0, 0.5]}},
     "grpo", {"beta": 0.04, "num_generations": 4, "max_completion_len": 128, "temperature": 0.9,
              "rewards": [{"name": "rewards:correct", "weight": 1.0}, {"name": "rewards:format", "weight": 0.5}]}),
])
def test_rl_methods(rl, extra, method, section):
    from ft_plugins.axolotl import convert as convert_data

    data = {"base_model": "m", "rl": rl, "datasets": [{"path": "p.jsonl", "type": "chatml.intel"}], **extra}
    result = convert_data(data)
    assert result.config["method"] == method and result.config[method] == section
    expected = {"kto": "kto", "grpo": "prompt"}.get(rl, "preference")  # GRPO trains on prompts
    assert result.config["datasets"][0]["type"] == expected


def test_what_cannot_be_expressed_is_listed_and_the_exit_code_says_if_training_changes(ft_runner, axolotl_config,
                                                                                         tmp_path):
    src, out = axolotl_config("alpaca")
    src.write_text(src.read_text() + "neftune_noise_alpha: 5\nmax_memory: {0: 20GiB}\nstrict: true\n")
    result = convert(ft_runner, src, out)
    assert result.exit_code == 3
    assert "neftune_noise_alpha" in result.output and "could not be expressed" in result.output
    text = out.read_text()
    head = text.split("\n\n")[0] if "\n\n" in text else text
    assert "# NOT expressed in ft, and they change training -- review them:" in text
    assert "#   neftune_noise_alpha: 5  -- NEFTune noise is not offered" in text
    assert "# Not expressed in ft (no effect on the trained weights):" in text
    assert "#   strict: True  -- axolotl's `strict` is about config checking" in text
    assert "max_memory" in head
    ft_runner.validate(out).assert_ok()  # still a valid config
    # an existing output is not replaced without --force
    again = convert(ft_runner, src, out)
    assert again.exit_code == 2 and "pass --force" in again.output
    assert ft_runner.invoke("convert", str(src), "-o", str(out), "--force").exit_code == 3


def test_printed_when_no_output_is_given(ft_runner, axolotl_config):
    src, _ = axolotl_config("qlora")
    result = ft_runner.invoke("convert", str(src))
    assert result.exit_code == 0
    assert "# Converted from" in result.output and "plugins: [lora, qlora, packing]" in result.output


def test_sharegpt_chat_config_converted_literally_trains_every_row(ft_runner, axolotl_config, tmp_path):
    # the issue: a ShareGPT chat config (from: human/gpt) translated literally used to drop every row
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    rows = [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in r["messages"]]}
            for r in make_chat_rows(12)]
    src, out = axolotl_config("chat_mappings")
    write_jsonl(tmp_path / "data.jsonl", rows)
    assert convert(ft_runner, src, out).exit_code == 0
    cfg = yaml.safe_load(out.read_text())
    assert cfg["chat_template"] == "chatml" and cfg["datasets"][0]["eot_tokens"] == ["<|im_end|>"]
    result = ft_runner.preprocess(out).assert_ok()
    assert "dropped nothing" in result.log
    stats = json.loads(next((tmp_path / "prepared").glob("*/stats.json")).read_text())
    assert stats["samples"] == 12 and stats["trained_tokens"] > 0
    # and with no mappings at all, as the axolotl user first wrote it: ShareGPT is recognised
    plain = {"base_model": cfg["base_model"], "chat_template": "chatml", "output_dir": str(tmp_path / "o2"),
             "dataset_prepared_path": str(tmp_path / "p2"),
             "datasets": [{"path": str(tmp_path / "data.jsonl"), "type": "chat_template"}]}
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain))
    assert "dropped nothing" in ft_runner.preprocess(tmp_path / "plain.yaml").assert_ok().log


# -- hints for axolotl keys in an ft config ---------------------------------------------------------


@pytest.mark.parametrize(("extra", "fragments"), [
    ({"adapter": "lora"}, ["adapter: unknown key.", "axolotl's `adapter: lora` is `plugins: [lora]` in ft",
                           "ft convert axolotl.yml"]),
    ({"adapter": "qlora"}, ["`plugins: [lora, qlora]`"]),
    ({"lora_r": 8}, ["lora_r: unknown key. This is axolotl's key: write `r:` in the `lora:` section"]),
    ({"sample_packing": True}, ["write `plugins: [packing]`"]),
    ({"wandb_project": "p"}, ["write `report_to: wandb` and `wandb: {project: ...}`"]),
    ({"flash_attention": True}, ["hf: {attn_implementation: flash_attention_2}"]),
    ({"process_reward_model": True}, ["write `method: prm`"]),
    ({"center_rewards_coefficient": 0.01}, ["`reward_model: {center_rewards_coefficient: ...}`"]),
])
def test_axolotl_keys_in_an_ft_config_say_what_to_write(ft_runner, ft_config, ft_dataset, extra, fragments):
    path = ft_config(name="mine.yaml", dataset=ft_dataset(), **extra)
    ft_runner.validate(path).assert_error("mine.yaml:", *fragments)


def test_axolotl_keys_in_dataset_entries_get_hints_too(ft_runner, ft_config, ft_dataset):
    data = ft_dataset()
    path = ft_config(datasets=[{"path": str(data), "type": "chat_template", "conversation": "chatml"}])
    ft_runner.validate(path).assert_error("datasets[0].conversation", "write the template name as `chat_template:`")


def test_hints_come_from_the_plugin(ft_runner, ft_config, ft_dataset):
    path = ft_config(dataset=ft_dataset(), adapter="lora")
    result = ft_runner.validate(path, "-p", "no:axolotl")
    assert result.exit_code != 0 and "unknown key" in result.output and "plugins: [lora]" not in result.output


def test_hints_for_table_keys_come_from_the_converter_tables():
    """The converter's tables are the one source of the hints for their keys: each table key has a hint naming
    the very field the converter writes, and that field exists in the ft section."""
    from ft_plugins import axolotl
    from ft_plugins.lora import LoraSection
    from ft_plugins.wandb import WandbSection

    def convert(**keys):
        base = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}
        return axolotl.convert({**base, **keys}).config

    hints = axolotl.key_hints()
    for table in (axolotl.LORA_KEYS, axolotl.ATTENTION, axolotl.LIGER_KEYS, axolotl.RENAMED_CORE, axolotl.WANDB_KEYS):
        assert set(table) <= set(hints), set(table) - set(hints)
    for key, field in axolotl.LORA_KEYS.items():
        assert f"`{field}:" in hints[key] and field in LoraSection.model_fields, key
        value = "adapters/x" if field == "init_from" else True if field.startswith("use_") else 8
        assert convert(adapter="lora", **{key: value})["lora"][field] == value, key
    for key in axolotl.WANDB_KEYS:
        field = key[len("wandb_"):]
        assert f"{field}:" in hints[key] and field in WandbSection.model_fields, key
        assert convert(**{key: "x"})["wandb"][field] == "x", key
    for key, impl in axolotl.ATTENTION.items():
        assert f"attn_implementation: {impl}" in hints[key]
        assert convert(**{key: True})["hf"]["attn_implementation"] == impl
    for key, name in axolotl.RENAMED_CORE.items():
        assert hints[key] == f"write `{name}:`."


def test_convert_never_replaces_its_own_input(ft_runner, axolotl_config, tmp_path):
    """Issue 22: `-o x.yml --force` on x.yml, a symlink or a hard link to it, replaced the axolotl config."""
    import os

    src, _ = axolotl_config("alpaca")
    original = src.read_text()
    os.symlink(src, tmp_path / "link.yml")
    os.link(src, tmp_path / "hard.yml")
    for out, said in ((src, f"-o {src} is the input"), (tmp_path / "link.yml", "is a link to the input"),
                      (tmp_path / "hard.yml", "is a link to the input")):
        ft_runner.invoke("convert", str(src), "-o", str(out), "--force").assert_error(said, "another file")
        assert src.read_text() == original


def test_convert_into_a_missing_folder_is_an_error_and_writes_nothing(ft_runner, axolotl_config, tmp_path):
    src, _ = axolotl_config("alpaca")
    out = tmp_path / "no" / "such" / "ft.yaml"
    ft_runner.invoke("convert", str(src), "-o", str(out)).assert_error(
        f"the folder {out.parent} does not exist", "mkdir -p")
    assert not (tmp_path / "no").exists()
    written = tmp_path / "ft.yaml"
    ft_runner.invoke("convert", str(src), "-o", str(written)).assert_ok()
    assert written.read_text().startswith("# Converted from") and oct(written.stat().st_mode & 0o777) != "0o600"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# -- meaning: what axolotl does is what the converted config does (issue 23) ----------------------------


def _convert(**data):
    from ft_plugins.axolotl import convert as convert_data

    base = {"base_model": "m", "datasets": [{"path": "p.jsonl", "type": "chat_template"}], "warmup_steps": 0}
    return convert_data({**base, **data})


def _dropped(result) -> list[str]:
    return [n.key for n in result.dropped_training]


def test_axolotl_alpaca_styles_are_flagged_not_silently_replaced():
    result = _convert(datasets=[{"path": "p.jsonl", "type": "alpaca:chat"}])
    assert result.config["datasets"][0]["type"] == "alpaca"
    assert _dropped(result) == ["datasets[0].type"]  # exit 3: ft's alpaca prompt is worded differently
    assert "prompt style is not offered" in result.dropped_training[0].reason
    assert _dropped(_convert(datasets=[{"path": "p.jsonl", "type": "alpaca"}])) == []


def test_axolotl_defaults_are_written_where_they_differ_from_fts():
    from ft_plugins.axolotl import convert as convert_data

    lora = _convert(adapter="lora", lora_r=8)
    assert lora.config["lora"] == {"r": 8, "dropout": 0.0}  # axolotl's lora_dropout default (ft: 0.05)
    assert _convert(adapter="lora", lora_dropout=0.1).config["lora"]["dropout"] == 0.1
    plain = {"base_model": "m", "datasets": [{"path": "p.jsonl", "type": "chat_template"}]}
    # no warmup key: axolotl warms up for min(3% of the steps, 100), and never for exactly 1 step
    assert convert_data({**plain, "max_steps": 1000}).config["warmup_steps"] == 30
    assert convert_data({**plain, "max_steps": 10000}).config["warmup_steps"] == 100
    assert convert_data({**plain, "max_steps": 50}).config["warmup_steps"] == 2
    by_epochs = convert_data({**plain, "num_epochs": 1})
    assert by_epochs.config["warmup_ratio"] == 0.03 and "warmup_steps" not in by_epochs.config
    assert not _dropped(by_epochs)  # written, with the 100-step cap as a caveat
    # transformers reads warmup_steps below 1 as a ratio
    fraction = convert_data({**plain, "warmup_steps": 0.1})
    assert fraction.config["warmup_ratio"] == 0.1 and "warmup_steps" not in fraction.config


# axolotl's renderings of the same-named templates, stated here (checked against axolotl's jinja files
# when this test was written): with a system message and without one.
NO_SYSTEM = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}, *NO_SYSTEM]
AXOLOTL_RENDERS = {  # name: (eos token of the family, without system, with system)
    "chatml": ("<|im_end|>", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n",
               "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
               "Hello!<|im_end|>\n"),
    "llama3": ("<|eot_id|>", "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant"
               "<|end_header_id|>\n\nHello!<|eot_id|>", "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief."
               "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant"
               "<|end_header_id|>\n\nHello!<|eot_id|>"),
    "phi_35": ("<|endoftext|>", "<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n",
               "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"),
    "deepseek_v3": ("<｜end▁of▁sentence｜>", "<s><｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜>",
                    "<s>Be brief.<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜>"),
    "mistral_v1": ("</s>", "<s> [INST] Hi [/INST] Hello!</s>", "<s> [INST] Be brief.\n\nHi [/INST] Hello!</s>"),
    # axolotl leaves the system message out of these two
    "mistral_v2v3": ("</s>", "<s>[INST] Hi[/INST] Hello!</s>", "<s>[INST] Hi[/INST] Hello!</s>"),
    "mistral_v3_tekken": ("</s>", "<s>[INST]Hi[/INST]Hello!</s>", "<s>[INST]Hi[/INST]Hello!</s>"),
}


def _ft_render(name: str, messages: list, eos: str) -> str:
    from ft_plugins.chat_template import compile_template, load_shipped_template

    return compile_template(load_shipped_template(name)).render(messages=messages, bos_token="<s>", eos_token=eos,
                                                                add_generation_prompt=False)


@pytest.mark.parametrize("name", sorted(AXOLOTL_RENDERS))
def test_same_named_templates_render_as_axolotls_after_conversion(name):
    from ft_plugins.axolotl import TEMPLATES

    eos, without, with_system = AXOLOTL_RENDERS[name]
    result = _convert(chat_template=name)
    entry = result.config["datasets"][0]
    assert not _dropped(result)
    messages = WITH_SYSTEM[1:] if entry.get("drop_system_message") else WITH_SYSTEM
    ft_name = TEMPLATES[name]
    assert _ft_render(ft_name, NO_SYSTEM, eos) == without
    assert _ft_render(ft_name, messages, eos) == with_system


@pytest.mark.parametrize(("name", "axolotl_without_system"), [
    ("phi_3", "<s><|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"),  # a leading BOS
    ("deepseek_v2", "<s><｜User｜>Hi<｜Assistant｜>Hello!</s>"),  # other role markers
    ("phi_4", None),  # axolotl inserts a default system prompt
    ("mistral_v7_tekken", None),  # the same, with today's date in it
])
def test_same_named_templates_that_render_differently_are_flagged(name, axolotl_without_system):
    from ft_plugins.axolotl import TEMPLATES

    result = _convert(chat_template=name)
    assert _dropped(result) == ["chat_template"]  # exit 3, with what differs
    rendered = _ft_render(TEMPLATES[name], NO_SYSTEM, "</s>")
    assert "system" not in rendered.lower() and "SYSTEM_PROMPT" not in rendered
    if axolotl_without_system:
        assert rendered != axolotl_without_system


def test_preference_entries_keep_roles_mappings_and_trained_roles():
    entry = {"path": "p.jsonl", "type": "chat_template.default", "field_messages": "conversation",
             "field_chosen": "chosen", "field_rejected": "rejected",
             "message_property_mappings": {"role": "from", "content": "value"},
             "roles": {"user": ["human"], "assistant": ["gpt"]}, "roles_to_train": ["assistant"],
             "unknown_thing": 3}
    result = _convert(rl="dpo", datasets=[entry])
    out = result.config["datasets"][0]
    assert out["field_prompt"] == "conversation"  # axolotl's field_messages: the prompt's messages
    assert out["message_property_mappings"] == {"role": "from", "content": "value"}
    assert out["roles"] == {"user": ["human"], "assistant": ["gpt"]} and out["roles_to_train"] == ["assistant"]
    assert _dropped(result) == ["datasets[0].unknown_thing"]  # nothing dropped silently


def test_model_type_causal_classes_pass_and_other_heads_are_flagged():
    for causal in ("AutoModelForCausalLM", "LlamaForCausalLM", "MistralForCausalLM"):
        assert _dropped(_convert(model_type=causal)) == []
    for head in ("AutoModelForSequenceClassification", "AutoModelForTokenClassification",
                 "AutoModelForImageTextToText"):
        assert _dropped(_convert(model_type=head)) == ["model_type"]


def test_an_rl_method_ft_lacks_is_refused_with_its_trl_block(ft_runner, tmp_path):
    src = tmp_path / "gdpo.yml"
    src.write_text("base_model: m\nrl: gdpo\ntrl:\n  num_generations: 4\n  epsilon: 0.2\n"
                   "datasets:\n  - path: p.jsonl\n    type: gdpo.transform\n")
    result = ft_runner.invoke("convert", str(src), "-o", str(tmp_path / "out.yaml"))
    assert result.exit_code == 2 and not (tmp_path / "out.yaml").exists()
    assert "rl: gdpo is a training method ft does not offer" in result.output
    assert "trl: settings (epsilon, num_generations)" in result.output


def test_orpo_argilla_reads_whole_conversations_and_trains_every_row(ft_runner, tmp_path, ft_tiny_model_dir):
    # axolotl's ORPO chat_template.argilla: chosen/rejected are conversations; a `prompt` text column repeats
    # the first user turn and must not become a second prompt
    rows = [{"prompt": f"Question {i}?", "chosen": [{"role": "user", "content": f"Question {i}?"},
                                                      {"role": "assistant", "content": f"Good answer {i}."}],
             "rejected": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Bad {i}."}]} for i in range(6)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    src = tmp_path / "orpo.yml"
    src.write_text(f"base_model: {ft_tiny_model_dir}\nrl: orpo\norpo_alpha: 0.1\nchat_template: chatml\n"
                   f"datasets:\n  - path: {data}\n    type: chat_template.argilla\n"
                   f"dataset_prepared_path: {tmp_path / 'prep'}\noutput_dir: {tmp_path / 'out'}\nwarmup_steps: 0\n")
    out = tmp_path / "orpo.ft.yaml"
    assert convert(ft_runner, src, out).exit_code == 0
    entry = yaml.safe_load(out.read_text())["datasets"][0]
    assert entry["field_chosen"] == "chosen" and entry["field_rejected"] == "rejected"
    result = ft_runner.preprocess(out).assert_ok()
    assert "dropped nothing" in result.log


def test_no_dataset_left_is_an_error_and_nothing_is_written(ft_runner, tmp_path):
    src = tmp_path / "rm.yml"
    src.write_text("base_model: m\ndatasets:\n  - path: p.jsonl\n    type: bradley_terry.chat_template\n")
    result = ft_runner.invoke("convert", str(src), "-o", str(tmp_path / "o.yaml"))
    assert result.exit_code == 2 and not (tmp_path / "o.yaml").exists()
    assert "no dataset could be converted" in result.output and "bradley_terry.chat_template" in result.output


def test_combinations_validate_refuses_are_adjusted(ft_runner, tmp_path, ft_tiny_model_dir):
    result = _convert(evals_per_epoch=0, saves_per_epoch=0, val_set_size=0.1)
    assert result.config["eval_strategy"] == "no" and "evals_per_epoch" not in result.config
    assert result.config["save_strategy"] == "no"
    sharded = _convert(adapter="lora", fsdp=["full_shard"], fsdp_config={"state_dict_type": "SHARDED_STATE_DICT"})
    assert "save" not in sharded.config["fsdp"] and not _dropped(sharded)
    both = _convert(plugins=["axolotl.integrations.liger.LigerPlugin"], liger_rope=True, torch_compile=True,
                    torch_compile_mode="max-autotune")
    assert both.config["plugins"] == ["liger"] and "compile" not in both.config and not _dropped(both)
    autotune = _convert(torch_compile=True, torch_compile_mode="max-autotune")
    assert autotune.config["compile"]["mode"] == "max-autotune-no-cudagraphs"
    qlora_fsdp = _convert(adapter="qlora", load_in_4bit=True, fsdp=["full_shard"])
    assert qlora_fsdp.config["plugins"] == ["lora", "qlora", "fsdp"] and not _dropped(qlora_fsdp)  # QLoRA + FSDP2
    storage = _convert(adapter="qlora", load_in_4bit=True, fsdp=["full_shard"],
                       bnb_config_kwargs={"bnb_4bit_quant_storage": "bfloat16"})
    assert not _dropped(storage) and "quant_storage" not in str(storage.config)  # ft picks the storage itself
    int8_fsdp = _convert(adapter="lora", load_in_8bit=True, fsdp=["full_shard"])
    assert "fsdp" in _dropped(int8_fsdp)  # 8-bit weights cannot be sharded: exit 3 with the reason, fsdp left out
    assert "fsdp" not in int8_fsdp.config["plugins"] and "fsdp" not in int8_fsdp.config
    offload = _convert(optimizer="adamw_bnb_8bit", deepspeed="deepspeed_configs/zero3_bf16_cpuoffload_all.json")
    assert offload.config["optimizer"] == "adamw_torch_fused" and "optimizer" in _dropped(offload)  # ZeRO-Offload's Adam
    no_adapter = _convert(lora_target_linear=True)  # a full fine-tune with a stray lora key
    assert "lora" not in no_adapter.config
    # each of them validates
    (tmp_path / "p.jsonl").write_text("")
    for i, res in enumerate((result, sharded, no_adapter, qlora_fsdp, int8_fsdp, offload)):
        cfg = dict(res.config, base_model=str(ft_tiny_model_dir), datasets=[{"path": "p.jsonl", "type": "chat_template"}])
        path = tmp_path / f"{i}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        ft_runner.validate(path).assert_ok()


def test_grpo_becomes_prompts_with_the_trl_block_mapped():
    result = _convert(rl="grpo", datasets=[{"path": "p.jsonl", "type": "rewards.transform", "split": "train"}],
                      trl={"beta": 0.0, "num_generations": 4, "scale_rewards": True, "log_completions": False,
                           "use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.5,
                           "epsilon_high": 0.28, "reward_funcs": ["rewards.acc"]})
    cfg = result.config
    assert cfg["datasets"][0] == {"path": "p.jsonl", "type": "prompt", "split": "train"}
    assert cfg["grpo"]["scale_rewards"] == "group" and cfg["grpo"]["log_completions_steps"] == 0
    assert cfg["grpo"]["epsilon_high"] == 0.28 and cfg["grpo"]["rewards"] == [{"name": "rewards:acc", "weight": 1.0}]
    assert cfg["grpo"]["is_correction"] == "sequence_mask"  # TRL's default correction of vLLM's sampling, written out
    assert "vllm" in cfg["plugins"] and cfg["vllm"] == {"mode": "colocate", "gpu_memory_utilization": 0.5}
    assert "datasets[0].type" in _dropped(result)  # axolotl's transform function is not run: said


def test_grpo_generation_and_importance_sampling_keys_are_mapped():
    result = _convert(rl="grpo", datasets=[{"path": "p.jsonl", "field_prompt": "prompt"}],
                      trl={"use_vllm": True, "vllm_importance_sampling_mode": "token_truncate",
                           "vllm_importance_sampling_clip_max": 2.0, "mask_truncated_completions": True,
                           "generation_kwargs": {"stop_token_ids": [7], "min_p": 0.1},
                           "chat_template_kwargs": {"enable_thinking": False}})
    grpo = result.config["grpo"]
    assert grpo["is_correction"] == "token_truncate" and grpo["is_cap"] == 2.0
    assert grpo["mask_truncated_completions"] is True and grpo["stop_token_ids"] == [7] and grpo["min_p"] == 0.1
    assert result.config["datasets"][0]["chat_template_kwargs"] == {"enable_thinking": False}
    assert not _dropped(result)
    off = _convert(rl="grpo", datasets=[{"path": "p.jsonl"}],
                   trl={"use_vllm": True, "vllm_importance_sampling_correction": False})
    assert off.config["grpo"]["is_correction"] == "none"


def test_equivalents_ft_has_are_used(ft_runner, tmp_path, ft_tiny_model_dir):
    dpo = _convert(rl="dpo", dpo_label_smoothing=0.1, precompute_ref_log_probs=True, max_prompt_len=256,
                   datasets=[{"path": "p.jsonl", "type": "chatml.intel"}])
    assert dpo.config["dpo"] == {"loss_type": "sigmoid", "label_smoothing": 0.1, "precompute_ref_logps": True,
                                 "max_prompt_len": 256}
    adam = _convert(adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-6, optimizer="adamw_torch_fused")
    assert adam.config["adam"] == {"beta1": 0.9, "beta2": 0.95, "epsilon": 1e-6} and not _dropped(adam)
    watchdog = _convert(loss_watchdog_threshold=5.0, loss_watchdog_patience=3)
    assert not _dropped(watchdog) and "health plugin" in watchdog.notes[0].reason
    assert _convert(revision_of_model="abc123").config["hf"] == {"revision": "abc123"}
    ignored = _convert(adam_eps=1e-5)  # not an axolotl key: axolotl ignores it, so ft does too
    assert "adam" not in ignored.config and not _dropped(ignored)
    cce = _convert(plugins=["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"])
    assert not _dropped(cce) and "fused_loss" in cce.notes[0].reason


def test_adam_section_reaches_the_trainer_and_is_checked(ft_runner, write_yaml, ft_tiny_model_dir):
    from ft_plugins.optimizers import ft_trainer_args

    from ft.kernel.context import load_context

    base = {"base_model": str(ft_tiny_model_dir), "datasets": [{"path": "x.jsonl", "type": "alpaca"}]}
    ctx = load_context({**base, "adam": {"beta2": 0.95, "epsilon": 1e-6}})
    assert ft_trainer_args(ctx.cfg) == {"adam_beta2": 0.95, "adam_epsilon": 1e-6}  # what was written, no more
    assert ft_trainer_args(load_context(base).cfg) == {}  # transformers' defaults, and room for other plugins
    bad = write_yaml({**base, "optimizer": "sgd", "adam": {"beta2": 0.95}})
    result = ft_runner.validate(bad)
    assert result.exit_code != 0 and "optimizer 'sgd' has no Adam betas" in result.output
    out_of_range = ft_runner.validate(write_yaml({**base, "adam": {"beta1": 1.5}}))
    assert out_of_range.exit_code != 0 and "adam.beta1" in out_of_range.output



# -- `ft validate` checks what `ft run` will hit --------------------------------------------------------


def test_validate_refuses_local_paths_that_do_not_exist_and_lets_hub_ids_pass(ft_runner, write_yaml, tmp_path,
                                                                              ft_tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", make_chat_rows(4))
    ok = {"base_model": str(ft_tiny_model_dir), "datasets": [{"path": str(data), "type": "chat_template"}]}
    ft_runner.validate(write_yaml(ok)).assert_ok()
    hub = {**ok, "base_model": "org/some-model", "datasets": [{"path": "org/some-dataset", "type": "chat_template"}]}
    ft_runner.validate(write_yaml(hub, "hub.yaml")).assert_ok()  # hub ids are not checked (no network)
    missing = {**ok, "base_model": str(tmp_path / "no-model"),
               "datasets": [{"path": "./no-data.jsonl", "type": "chat_template"}]}
    result = ft_runner.validate(write_yaml(missing, "missing.yaml"))
    assert result.exit_code == 2
    assert f"base_model: '{tmp_path / 'no-model'}' is a local path that does not exist" in result.output
    assert "datasets[0].path: file './no-data.jsonl' not found" in result.output
    # a relative file next to the config is found, as `ft run` finds it
    beside = {**ok, "datasets": [{"path": "d.jsonl", "type": "chat_template"}]}
    ft_runner.validate(write_yaml(beside, "beside.yaml")).assert_ok()


def test_validate_refuses_an_attention_implementation_whose_package_is_missing(ft_runner, write_yaml, tmp_path,
                                                                               ft_tiny_model_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    data = write_jsonl(tmp_path / "d.jsonl", make_chat_rows(4))
    cfg = {"base_model": str(ft_tiny_model_dir), "datasets": [{"path": str(data), "type": "chat_template"}],
           "hf": {"attn_implementation": "flash_attention_2"}}
    result = ft_runner.validate(write_yaml(cfg))
    assert result.exit_code == 2
    assert "hf.attn_implementation: flash_attention_2 needs the 'flash_attn' package, which is not installed" in \
        result.output


def test_validate_refuses_bf16_true_without_a_gpu(ft_runner, write_yaml, tmp_path, ft_tiny_model_dir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = write_jsonl(tmp_path / "d.jsonl", make_chat_rows(4))
    cfg = {"base_model": str(ft_tiny_model_dir), "datasets": [{"path": str(data), "type": "chat_template"}], "bf16": True}
    result = ft_runner.validate(write_yaml(cfg))
    assert result.exit_code == 2 and "bf16: true needs a GPU with bf16 support" in result.output
    ft_runner.validate(write_yaml({**cfg, "bf16": "auto"}, "auto.yaml")).assert_ok()


# -- the corpus harness (bench/axolotl_corpus.py) -----------------------------------------------------


def test_corpus_harness_reports_validated_refused_and_flagged_configs(tmp_path, ft_tiny_model_dir, capsys):
    from test_bench_train import load_bench

    data = write_jsonl(tmp_path / "d.jsonl", make_chat_rows(4))
    folder = tmp_path / "configs"
    folder.mkdir()
    sft = f"base_model: {ft_tiny_model_dir}\ndatasets:\n  - path: {data}\n    type: chat_template\n"
    (folder / "sft.yml").write_text(sft)
    (folder / "dpo.yml").write_text(f"base_model: {ft_tiny_model_dir}\nrl: dpo\ndatasets:\n  - path: {data}\n"
                                    "    type: chatml.intel\n")
    (folder / "classifier.yml").write_text(sft + "model_type: AutoModelForSequenceClassification\n")
    (folder / "gdpo.yml").write_text(sft + "rl: gdpo\n")
    (folder / "gpu.yml").write_text(sft + "flash_attention: true\nbf16: true\n")
    (folder / "launcher.yaml").write_text("provider: somewhere\ngpu: h100\n")  # not a training config
    loader = load_bench(Path(__file__).resolve().parents[2] / "bench" / "axolotl_corpus.py", "ft_bench_axolotl")
    bench = next(loader)
    try:
        report = bench.main([str(folder)])
    finally:
        next(loader, None)
    assert json.loads(capsys.readouterr().out) == report
    assert report["configs"] == 5 and report["skipped"] == ["launcher.yaml"]
    assert report["convert_exit"] == {"0": 3, "3": 1, "2": 1}
    assert report["dropped"] == {"model_type": 1}
    assert list(report["refused"]) == ["rl: gdpo is a training method ft does not offer (ft has dpo, ebft, grpo, "
                                       "ipo, kto, orpo, simpo). Nothing was written."]
    assert report["validated_by_rl"] == {"dpo": "1/1", "gdpo": "0/1"} and report["tracebacks"] == []
    # gpu.yml is refused here only for flash-attn / bf16 on a CPU machine, if this machine lacks them
    assert report["validated_with_gpu_and_packages"] == 4
    assert report["validated_here"] + report["validated_but_for_this_machine"] == 4


# -- reward models, process reward models and EBFT ------------------------------------------------


def _convert_file(ft_runner, tmp_path, ft_tiny_model_dir, data: dict, rows: list[dict]) -> tuple:
    """Write ``data`` (an axolotl config on the tiny model, its dataset ``rows``) and ``ft convert`` it."""
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    data = {"base_model": str(ft_tiny_model_dir), "sequence_len": 256, "micro_batch_size": 2, "warmup_steps": 0,
            "dataset_prepared_path": str(tmp_path / "prepared"), "output_dir": str(tmp_path / "out"), **data}
    data["datasets"] = [dict(entry, path=str(path)) for entry in data["datasets"]]
    src, out = tmp_path / "axolotl.yml", tmp_path / "ft.yaml"
    src.write_text(yaml.safe_dump(data))
    result = convert(ft_runner, src, out)
    return result, (yaml.safe_load(out.read_text()) if out.exists() else None), out


def test_reward_model_config_becomes_method_reward_model(ft_runner, tmp_path, ft_tiny_model_dir):
    rows = [{"system": "Be brief." if i % 2 else "", "input": f"What is {i} + {i}?", "chosen": f"{2 * i}.",
             "rejected": f"I am not sure about {i}."} for i in range(6)]
    result, cfg, out = _convert_file(ft_runner, tmp_path, ft_tiny_model_dir, {
        "model_type": "AutoModelForSequenceClassification", "num_labels": 1, "reward_model": True,
        "center_rewards_coefficient": 0.01, "chat_template": "chatml",
        "datasets": [{"type": "bradley_terry.chat_template"}]}, rows)
    assert result.exit_code == 0, result.output  # model_type and num_labels are the method's own head: no note
    assert cfg["method"] == "reward_model" and cfg["reward_model"] == {"center_rewards_coefficient": 0.01}
    assert cfg["datasets"][0] == {"path": str(tmp_path / "rows.jsonl"), "type": "preference", "field_prompt": "input",
                                  "field_chosen": "chosen", "field_rejected": "rejected", "field_system": "system"}
    assert cfg["excess_length"] == "truncate"  # axolotl cuts over-long sides and keeps the pair
    assert "model_type" not in cfg and "num_labels" not in cfg
    ft_runner.validate(out).assert_ok()
    assert "dropped nothing" in ft_runner.preprocess(out).assert_ok().log  # the columns axolotl reads are read


def test_reward_flags_with_another_head_or_label_count_are_flagged():
    assert _dropped(_convert(reward_model=True, model_type="AutoModelForTokenClassification", num_labels=2,
                             datasets=[{"path": "p.jsonl", "type": "bradley_terry.chat_template"}])) == \
        ["model_type", "num_labels"]
    assert _dropped(_convert(process_reward_model=True, model_type="AutoModelForSequenceClassification",
                             datasets=[{"path": "p.jsonl", "type": "stepwise_supervised"}])) == ["model_type"]
    capped = _convert(process_reward_model=True, datasets=[{"path": "p.jsonl", "type": "stepwise_supervised",
                                                            "max_completion_length": 64}])
    assert _dropped(capped) == ["datasets[0].max_completion_length"]  # ft cannot cut the steps alone
    # axolotl's center_rewards_coefficient means nothing without reward_model; ft's section is not written then
    plain = _convert(center_rewards_coefficient=0.01)
    assert "reward_model" not in plain.config and not _dropped(plain)


def test_process_reward_model_config_becomes_method_prm(ft_runner, tmp_path, ft_tiny_model_dir):
    rows = [{"prompt": f"Add {i} and {i}.", "completions": [f"Step one: {i} + {i}.", f"So {2 * i}."],
             "labels": [True, i % 3 != 0]} for i in range(6)]
    result, cfg, out = _convert_file(ft_runner, tmp_path, ft_tiny_model_dir, {
        "model_type": "AutoModelForTokenClassification", "num_labels": 2, "process_reward_model": True,
        "datasets": [{"type": "stepwise_supervised", "step_separator": "\n", "max_completion_length": None,
                      "train_on_last_step_only": False}]}, rows)
    assert result.exit_code == 0, result.output
    assert cfg["method"] == "prm" and cfg["excess_length"] == "truncate"
    assert cfg["datasets"][0] == {"path": str(tmp_path / "rows.jsonl"), "type": "stepwise_supervised",
                                  "step_separator": "\n", "train_on_last_step_only": False}
    assert 'step_separator: "\\n"' in out.read_text()  # a readable separator, not a YAML block scalar
    ft_runner.validate(out).assert_ok()
    assert "dropped nothing" in ft_runner.preprocess(out).assert_ok().log


def test_ebft_structured_config_becomes_method_ebft(ft_runner, tmp_path, ft_tiny_model_dir):
    rows = [{"input": f"Write {i} in words.", "output": f"The number {i}."} for i in range(6)]
    result, cfg, out = _convert_file(ft_runner, tmp_path, ft_tiny_model_dir, {
        "rl": "ebft", "chat_template": "chatml",
        "ebft": {"feature_layers": [0.5], "embed_method": "completion_mean", "use_whitening": False,
                 "alignment_coef": 1.0, "diversity_coef": 0.5, "ce_coef": 0.0},
        "trl": {"num_generations": 2, "max_completion_length": 8, "temperature": 0.7, "use_vllm": False,
                "scale_rewards": True, "loss_type": "grpo", "epsilon": 0.2},
        "datasets": [{"type": "ebft_opencode.transform", "split": "train"}]}, rows)
    assert result.exit_code == 0, result.output
    assert cfg["method"] == "ebft"
    # axolotl doubles both terms (the paper's factor 2): folded into ft's coefficients
    assert cfg["ebft"] == {"num_generations": 2, "max_completion_len": 8, "temperature": 0.7, "scale_rewards": "group",
                           "loss_type": "grpo", "epsilon": 0.2, "layers": [0.5], "normalization": "joint",
                           "pooling": "mean", "alignment_coef": 2.0, "diversity_coef": 1.0}
    assert cfg["datasets"][0] == {"path": str(tmp_path / "rows.jsonl"), "type": "prompt_reference", "split": "train",
                                  "field_prompt": "input", "field_reference": "output", "apply_chat_template": True}
    ft_runner.validate(out).assert_ok()
    assert "dropped nothing" in ft_runner.preprocess(out).assert_ok().log


def test_ebft_options_ft_lacks_are_flagged():
    result = _convert(rl="ebft", ebft={"feature_layers": [0.25, 0.5, 0.75], "use_whitening": True, "ce_coef": 0.03,
                                       "embed_method": "concat"},
                      trl={"use_vllm": True, "num_generations": 4}, datasets=[{"path": "p.jsonl", "type": "mine.fn"}])
    assert sorted(_dropped(result)) == sorted([
        "ebft.embed_method", "ebft.ce_coef",
        "ebft.adaptive_max_tokens",  # on by default with vLLM: completions capped by the reference's length
        "datasets[0].type"])  # a transform of the user's: not run, ft reads prompt + ground_truth
    assert result.config["datasets"][0]["field_reference"] == "ground_truth"
    assert "pooling" not in result.config["ebft"] and "vllm" in result.config["plugins"]
    # whitening and axolotl's structured normalisation (the layers concatenated, normalised as one vector) map
    assert result.config["ebft"]["whitening"] is True and result.config["ebft"]["normalization"] == "joint"


def test_ebft_strided_whitening_maps_and_keeps_the_diversity_scale():
    """Strided mode normalises each layer (ft's per_layer); whitened features do not depend on that scale, so
    the x layers factor of the unwhitened diversity is not applied."""
    ebft = {"mode": "strided", "n_samples_per_prompt": 2, "feature_layers": [0.25, 0.5, 0.75],
            "embed_method": "last_token", "advantage_estimator": "rloo"}
    plain = _convert(rl="ebft", ebft=ebft, datasets=[{"path": "p.jsonl", "type": "ebft_pretrain.transform"}])
    whitened = _convert(rl="ebft", ebft={**ebft, "use_whitening": True},
                        datasets=[{"path": "p.jsonl", "type": "ebft_pretrain.transform"}])
    assert "ebft.use_whitening" not in _dropped(whitened)
    assert "whitening" not in plain.config["ebft"] and "normalization" not in plain.config["ebft"]  # per_layer
    assert whitened.config["ebft"]["whitening"] is True and "normalization" not in whitened.config["ebft"]
    assert plain.config["ebft"]["diversity_coef"] == 12.0 and whitened.config["ebft"]["diversity_coef"] == 4.0
    assert plain.config["ebft"]["alignment_coef"] == whitened.config["ebft"]["alignment_coef"] == 4.0


def test_ebft_strided_config_becomes_type_strided(ft_runner, tmp_path, ft_tiny_model_dir):
    rows = [{"text": " ".join(f"word{j}" for j in range(i, i + 40))} for i in range(4)]
    result, cfg, out = _convert_file(ft_runner, tmp_path, ft_tiny_model_dir, {
        "rl": "ebft", "micro_batch_size": 1, "gradient_accumulation_steps": 2,
        "ebft": {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 4,
                 "n_samples_per_prompt": 2, "feature_layers": [0.25, 0.5, 0.75], "embed_method": "mean_pooling",
                 "use_whitening": False, "advantage_estimator": "rloo", "rl_coef": 1.0},
        "datasets": [{"type": "ebft_pretrain.transform", "split": "train"}]}, rows)
    assert result.exit_code == 3  # the transform is the user's module: said, and ft's anchors cover whole documents
    assert "datasets[0].type" in result.output
    assert "ebft.embed_method" in result.output  # strided mean_pooling averages per-token normalised states
    # axolotl's defaults written (temperature 0.6); RLOO = the group-mean advantage x n/(n-1), unscaled; its
    # diversity is a dot product of per-layer-normalised features (x 3 layers); the paper's factor 2 on both
    assert cfg["ebft"] == {"num_generations": 2, "max_completion_len": 4, "temperature": 0.6, "top_p": 1.0,
                           "layers": [0.25, 0.5, 0.75], "pooling": "mean", "scale_rewards": "none",
                           "loss_type": "bnpo", "alignment_coef": 4.0, "diversity_coef": 12.0}
    assert cfg["datasets"][0] == {"path": str(tmp_path / "rows.jsonl"), "type": "strided", "split": "train",
                                  "stride": 8, "context_len": 8}
    assert cfg["micro_batch_size"] == 2  # one anchor's group per document (ft's micro-batch counts completions)
    ft_runner.validate(out).assert_ok()
    assert "dropped nothing" in ft_runner.preprocess(out).assert_ok().log


def test_ebft_strided_anchors_inside_completions_are_refused(ft_runner, tmp_path):
    src = tmp_path / "ebft.yml"
    src.write_text("base_model: m\nrl: ebft\nebft:\n  mode: strided\n  use_whitening: true\n"
                   "datasets:\n  - path: p.jsonl\n    type: ebft_strided_structured.transform\n")
    result = ft_runner.invoke("convert", str(src), "-o", str(tmp_path / "out.yaml"))
    assert result.exit_code == 2 and not (tmp_path / "out.yaml").exists()
    assert "anchors inside the completions" in result.output


# -- pretraining_dataset and streaming -> streamed datasets -----------------------------------------


def test_pretraining_dataset_becomes_a_streamed_completion_dataset():
    result = _convert(pretraining_dataset=[{"path": "allenai/c4", "name": "en", "type": "pretrain", "split": "train",
                                            "text_column": "content", "skip": 0, "trust_remote_code": False},
                                           {"path": "org/second"}],
                      max_steps=200, sample_packing=True, pretrain_multipack_attn=True, val_set_size=0.05)
    cfg = result.config
    assert cfg["datasets"] == [{"path": "allenai/c4", "type": "completion", "split": "train", "name": "en",
                                "field": "content", "streaming": True}]
    assert cfg["max_steps"] == 200 and cfg["plugins"] == ["packing"] and "val_set_size" not in cfg
    assert not _dropped(result)  # axolotl reads the first entry only, and ignores datasets: nothing of training lost
    keys = {n.key: n for n in result.notes}
    assert "first pretraining_dataset entry only" in keys["pretraining_dataset[1]"].reason
    assert "trains on pretraining_dataset when it is set" in keys["datasets"].reason
    assert keys["pretraining_dataset[0].type"].expressed  # the tokenizer's overlap, said
    short = _convert(pretraining_dataset="org/corpus", max_steps=10, datasets=[])
    assert short.config["datasets"] == [{"path": "org/corpus", "type": "completion", "streaming": True}]


def test_pretraining_options_ft_lacks_are_flagged_and_max_steps_is_required():
    from ft.kernel.errors import FtError

    skip = _convert(pretraining_dataset=[{"path": "c4", "type": "pretrain", "skip": 100}], max_steps=5,
                    pretraining_sample_concatenation=True, pretrain_multipack_attn=False)
    assert sorted(_dropped(skip)) == ["pretrain_multipack_attn", "pretraining_dataset[0].skip",
                                      "pretraining_sample_concatenation"]
    with pytest.raises(FtError, match="no dataset could be converted.*multimodal_pretrain"):
        _convert(pretraining_dataset=[{"path": "c4", "type": "multimodal_pretrain"}], max_steps=5, datasets=[])
    with pytest.raises(FtError, match="pretraining_dataset streams the training data.*need max_steps"):
        _convert(pretraining_dataset=[{"path": "c4", "type": "pretrain"}], num_epochs=1)


def test_axolotl_streaming_streams_every_training_dataset():
    result = _convert(streaming=True, max_steps=20, datasets=[{"path": "tatsu-lab/alpaca", "type": "alpaca"}],
                      streaming_multipack_buffer_size=10000)
    assert result.config["datasets"] == [{"path": "tatsu-lab/alpaca", "type": "alpaca", "streaming": True}]
    assert not _dropped(result)


def test_a_converted_pretraining_config_validates_and_trains_streamed(ft_runner, tmp_path, ft_tiny_model_dir):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"body": f"document {i}: " + "words and more words " * (i % 9 + 1)}
                                                     for i in range(60)])
    src, out = tmp_path / "pretrain.yml", tmp_path / "ft.yaml"
    src.write_text(yaml.safe_dump({
        "base_model": str(ft_tiny_model_dir), "sequence_len": 64, "micro_batch_size": 2, "max_steps": 3,
        "sample_packing": True, "val_set_size": 0.0, "dataset_prepared_path": None, "output_dir": str(tmp_path / "o"),
        "pretraining_dataset": [{"path": str(corpus), "type": "pretrain", "text_column": "body"}],
    }))
    convert(ft_runner, src, out)
    assert yaml.safe_load(out.read_text())["datasets"][0]["streaming"] is True
    ft_runner.validate(out).assert_ok()
    run = ft_runner.run(out, "--set", "bf16=false").assert_ok()
    assert "nothing is cached" in run.log
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["summary"]["steps"] == 3


def test_torch_dtype_has_no_effect_in_axolotl_so_it_is_not_an_exit_3():
    """axolotl's resolve_dtype sets cfg.torch_dtype from bf16/fp16/float16, overwriting a user's torch_dtype."""
    result = _convert(torch_dtype="bfloat16", bf16="auto")
    assert "torch_dtype" not in _dropped(result)
    assert any(n.key == "torch_dtype" and "resolve_dtype" in n.reason for n in result.notes)
