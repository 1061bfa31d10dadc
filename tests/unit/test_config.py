"""Every config option and recipe composes against the schema; typos and bad values fail with the fix."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from bamba_ft.config.overrides import check_overrides, to_run_config
from bamba_ft.config.schema import TASK_JOBS, RunConfig, validate
from bamba_ft.config.store import config_dirs, recipe_names, register_configs
from bamba_ft.errors import ConfigError

CONF, RECIPES = config_dirs()
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")


@pytest.fixture
def data_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A current directory holding the data files these tests name: validate refuses a file that does not exist."""
    monkeypatch.chdir(tmp_path)
    for name in ("train.jsonl", "x.jsonl", "a.jsonl", "b.jsonl"):
        (tmp_path / name).touch()
    return tmp_path


def composed(overrides: list[str]) -> RunConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["output_dir=/tmp/bamba_ft_test", *overrides])
    return to_run_config(cfg)


def test_default_is_sft_on_the_builtin_task() -> None:
    cfg = composed([])
    assert (cfg.task, cfg.peft.method, cfg.data.source, cfg.model.name_or_path) == ("train", "lora", "builtin", "builtin:tiny")
    assert cfg.data.packing is True


@pytest.mark.parametrize("option", [f"{g}={p.stem}" for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))])
def test_every_group_option_composes(option: str, monkeypatch: pytest.MonkeyPatch, data_files: Path) -> None:
    import importlib.util

    extra = ["data.source=train.jsonl"] if option == "data=file" else []
    if option == "logger=wandb":  # an optional package: its absence is refused (test_wandb_that_cannot_start...)
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else real(name, *a))
    composed([option, *extra])


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipe_composes(recipe: str) -> None:
    cfg = composed([f"recipe={recipe}"])
    first_line = (RECIPES / f"{recipe}.yaml").read_text().splitlines()[0]
    assert first_line.startswith(f"# python -m bamba_ft recipe={recipe}")  # each recipe starts with its command
    assert callable(importlib.import_module(TASK_JOBS[cfg.task]).run)  # the task resolves to a job


def test_help_names_every_recipe() -> None:
    """`python -m bamba_ft --help` opens with the recipes, one line each."""
    header = OmegaConf.load(CONF / "train.yaml").hydra.help.header
    listed = [line.split()[0].removeprefix("recipe=") for line in header.splitlines() if line.startswith("recipe=")]
    assert sorted(listed) == sorted(recipe_names())


def test_recipe_qlora_sets_its_groups() -> None:
    cfg = composed(["recipe=qlora"])
    assert cfg.quant.method == "nf4" and cfg.peft.method == "lora" and cfg.model.gradient_checkpointing == "all"


def test_unknown_recipe_lists_the_options() -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(MissingConfigException, match=r"(?s)sfft.*sft"):
            compose("train", overrides=["recipe=sfft"])


@pytest.mark.parametrize("token,problem,option", [
    ("recipe=sftt", "recipe='sftt' is not an option. Did you mean 'sft'?", "qlora"),
    ("model=bamba-10b", "model='bamba-10b' is not an option. Did you mean 'bamba-9b'?", "tiny"),
    ("model=tiny,bamba-10b", "model='bamba-10b' is not an option", "tiny"),  # each value of a sweep
])
def test_an_unknown_group_option_names_the_options(token: str, problem: str, option: str) -> None:
    with pytest.raises(ConfigError, match=r"(?s)" + re.escape(problem) + r".*Valid: .*" + option):
        check_overrides([token])
    check_overrides(["-m", "recipe=eval", "model=tiny,bamba-9b", "sweep=lora_hpo", "~smoke", "data=file"])
    with pytest.raises(ConfigError, match=r"smoke=null: a config group takes an option name.*\n.*Fix: ~smoke"):
        check_overrides(["smoke=null"])


def test_commas_outside_a_sweep_say_how_to_quote_a_text() -> None:
    """Hydra reads a,b as sweep values and, without -m, answered with its own three-way message."""
    with pytest.raises(ConfigError, match=re.escape("""Fix: quote a text that holds commas, 'trainer.resume="runs/a, b"', """
                                                    "or add -m")):
        check_overrides(["trainer.resume=runs/a, b"])
    with pytest.raises(ConfigError, match=r"optim.lr=1e-3,2e-3: the commas .*\n.*Fix: add -m to run one job per value"):
        check_overrides(["optim.lr=1e-3,2e-3"])
    check_overrides(["-m", "optim.lr=1e-3,2e-3"])
    check_overrides(['trainer.resume="runs/a, b"'])


def test_a_home_path_outside_quotes_says_to_quote_it() -> None:
    """Hydra reads a leading ~ as its delete mark and fails on ~/x: the fix is the quoted form, which parses."""
    with pytest.raises(ConfigError, match=re.escape("""needs quotes (Hydra reads ~ as its delete mark): """
                                                    """'data.source="~/x.jsonl"'""")):
        check_overrides(["data=file", "data.source=~/x.jsonl"])
    check_overrides(["data=file", 'data.source="~/x.jsonl"'])


@pytest.mark.parametrize("token", ["data.roles={bot: assistant, human: user}", "data.roles.bot=assistant"])
def test_data_roles_take_the_users_own_names(token: str, data_files: Path) -> None:
    """The form the README and the unknown-role error give: a mapping that the command line fills."""
    check_overrides([token])
    cfg = composed(["data=file", "data.source=train.jsonl", token])
    assert cfg.data.roles["bot"] == "assistant"


def test_a_typo_inside_a_list_of_sources_names_the_item_and_the_key() -> None:
    with pytest.raises(ConfigError, match=r"(?s)item 1 of the list: 'wieght' is not a key of data.sources.1\. "
                                          r"Did you mean 'weight'\?.*Valid keys of data.sources.1: source"):
        check_overrides(["data.sources=[{source: a.jsonl}, {source: b.jsonl, wieght: 0.7}]"])
    check_overrides(["data.sources=[{source: a.jsonl}, {source: b.jsonl, weight: 0.7}]"])


@pytest.mark.parametrize("token", ["peft.rr=8", "+peft.rr=8", "++peft.rr=8"])
def test_typo_override_names_key_and_valid_ones(token: str) -> None:
    with pytest.raises(ConfigError, match=r"(?s)'rr' is not a key of peft\. Did you mean 'r'\?.*Valid keys of peft: method, r, lora_alpha"):
        check_overrides([token])


def test_readme_shows_the_typo_message_as_it_is() -> None:
    """README's "Configuration" prints the message of `python -m bamba_ft peft.rr=8`; it lost a key of peft."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    shown = readme.split("$ python -m bamba_ft peft.rr=8\n", 1)[1].split("```", 1)[0]
    with pytest.raises(ConfigError) as e:
        check_overrides(["peft.rr=8"])
    assert shown == f"bamba_ft: ConfigError: {e.value}\n"


def test_typo_in_nested_and_top_level_keys() -> None:
    with pytest.raises(ConfigError, match=r"(?s)2 problems.*'lr_rate' is not a key of optim.*'trainr' is not a key of the top level"):
        check_overrides(["optim.lr_rate=1", "trainr.max_steps=3", "model=tiny", "hydra.run.dir=x", "-m"])
    check_overrides(["-m", "optim.lr=1e-4,3e-4", "peft.target_modules=[in_proj]", "data.source=x.jsonl"])


@pytest.mark.parametrize(("token", "group"), [("recpie=eval", "recipe"), ("smok=fast", "smoke")])
def test_a_misspelt_group_is_matched_against_the_groups(token: str, group: str) -> None:
    """recpie=eval was asked 'Did you mean preview?': the groups outside the schema's keys were no candidates."""
    with pytest.raises(ConfigError, match=rf"(?s)Did you mean '{group}'\?.*config groups \(group=option\): recipe, smoke"):
        check_overrides([token])


def test_plus_key_is_caught_after_composition() -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["output_dir=/tmp/x", "+peft.rr=8"])
    with pytest.raises(ConfigError, match=r"peft.rr: 'rr' is not a key of peft"):
        to_run_config(cfg)


def test_typo_in_a_yaml_file_fails(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    import shutil

    shutil.copytree(CONF, conf)
    (conf / "peft" / "typo.yaml").write_text("method: lora\nalhpa: 3\n")
    register_configs()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with pytest.raises((ConfigCompositionException, ConfigKeyError), match="alhpa"):
            compose("train", overrides=["output_dir=/tmp/x", "peft=typo"])


def test_bad_values_gathered_into_one_error() -> None:
    cfg = RunConfig()
    cfg.quant.method = "nf5"
    cfg.peft.r = 0
    cfg.peft.lora_alpha = -4.0
    cfg.data.max_tokens_per_batch = 100
    with pytest.raises(ConfigError, match=r"(?s)4 problems.*quant.method='nf5' is not an option\. Did you mean 'nf4'\? "
                                          r"Valid: none, nf4, int8, int4, fp8.*peft.r=0 must be positive.*"
                                          r"peft.lora_alpha=-4.0 must be positive.*smaller than one sequence"):
        validate(cfg)


def test_trainer_intervals_are_checked_before_anything_runs() -> None:
    """trainer.val_check_interval=0 used to reach Lightning and end the run in a ZeroDivisionError traceback."""
    cfg = RunConfig()
    cfg.trainer.val_check_interval, cfg.trainer.log_every_n_steps, cfg.trainer.checkpoint_every_n_steps = 0, -1, -1
    with pytest.raises(ConfigError, match=r"(?s)3 problems.*trainer.val_check_interval=0 must be positive.*"
                                          r"trainer.log_every_n_steps=-1 must be 0 or more.*"
                                          r"trainer.checkpoint_every_n_steps=-1 must be 0 or more"):
        validate(cfg)
    cfg.trainer.val_check_interval, cfg.trainer.log_every_n_steps, cfg.trainer.checkpoint_every_n_steps = 1, 0, 0
    validate(cfg)


def test_generation_settings_are_checked_before_anything_runs() -> None:
    cfg = RunConfig()
    cfg.eval.batch_size, cfg.eval.max_new_tokens, cfg.eval.num_generate = 0, 0, -1
    cfg.eval.do_sample, cfg.eval.temperature, cfg.eval.top_p, cfg.eval.top_k = True, 0.0, 1.5, -3
    with pytest.raises(ConfigError, match=r"(?s)6 problems.*eval.batch_size=0 must be positive.*"
                                          r"eval.max_new_tokens=0.*eval.num_generate=-1.*eval.temperature=0.0 must be "
                                          r"positive when sampling.*eval.top_p=1.5.*eval.top_k=-3"):
        validate(cfg)
    cfg.eval.do_sample = False  # greedy decoding reads none of the sampling settings
    cfg.eval.temperature, cfg.eval.top_p, cfg.eval.top_k = 1.0, 1.0, 0
    cfg.eval.batch_size, cfg.eval.max_new_tokens, cfg.eval.num_generate = 8, 16, 0
    validate(cfg)


def test_generation_sampling_settings_without_sampling_are_refused() -> None:
    cfg = RunConfig(task="generate")
    cfg.generate.temperature, cfg.generate.top_k = 0.7, 5
    with pytest.raises(ConfigError, match=r"(?s)1 problem.*generate.temperature=0.7, generate.top_k=5: decoding is "
                                          r"greedy \(generate.do_sample=false\).*they would be ignored.*"
                                          r"Fix: add generate.do_sample=true to sample, or drop "
                                          r"generate.temperature generate.top_k"):
        validate(cfg)
    cfg.eval.top_p = 0.9
    with pytest.raises(ConfigError, match=r"(?s)2 problems.*eval.top_p=0.9: decoding is greedy.*it would be ignored"):
        validate(cfg)
    cfg.generate.do_sample = cfg.eval.do_sample = True  # sampling reads them
    validate(cfg)


def test_generation_system_without_the_chat_template_is_refused() -> None:
    cfg = RunConfig(task="generate")
    cfg.generate.chat, cfg.generate.system = False, "Answer briefly."
    with pytest.raises(ConfigError, match=r"(?s)1 problem.*generate.system=Answer briefly.: generate.chat=false "
                                          r"continues plain text without the chat template.*would be ignored.*"
                                          r"Fix: drop generate.chat=false.*or drop generate.system"):
        validate(cfg)
    cfg.generate.chat = True  # the template puts it before each prompt
    validate(cfg)


def test_lm_eval_tasks_are_refused_where_they_would_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    cfg = RunConfig()
    cfg.eval.lm_eval_tasks = ["hellaswag"]
    with pytest.raises(ConfigError, match=r"runs in recipe=eval only; this is task=train"):
        validate(cfg)
    cfg.task = "eval"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else object())
    with pytest.raises(ConfigError, match=r"needs the lm-eval package.*\n.*pip install lm-eval"):
        validate(cfg)


def test_full_finetune_with_quantized_base_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"quant.method=nf4 freezes quantized base weights"):
        composed(["recipe=qlora", "peft=none"])


def test_full_finetune_from_a_trained_adapter_is_refused_with_the_merge_as_the_way() -> None:
    """recipe=full peft.init_from=RUN ended, once the model had loaded, in peft's AttributeError traceback."""
    with pytest.raises(ConfigError, match=r"(?s)peft.init_from=runs/a loads a trained adapter .* peft.method=none "
                                          r"\(full fine-tuning\) has none.*Fix: drop peft.init_from.*model.name_or_path"):
        composed(["recipe=full", "peft.init_from=runs/a"])
    assert composed(["recipe=sft", "peft.init_from=runs/a"]).peft.init_from == "runs/a"


def test_fp8_base_composes_with_lora_and_refuses_what_quantized_bases_cannot_do() -> None:
    cfg = composed(["recipe=qlora", "quant=fp8"])
    assert cfg.quant.method == "fp8" and cfg.peft.method == "lora"
    assert composed(["quant.method=fp8"]).quant.method == "fp8"
    with pytest.raises(ConfigError, match=r"quant.method=fp8 freezes quantized base weights"):
        composed(["recipe=qlora", "quant=fp8", "peft=none"])
    with pytest.raises(ConfigError, match=r"peft.use_dora=true with a quantized base .* Fix: peft.use_dora=false"):
        composed(["recipe=qlora", "quant=fp8", "peft.use_dora=true"])


def test_lengths_beyond_int32_and_bad_stride_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"(?s)2 problems.*data.max_seq_len=3000000000 is more than 2\^31-1"
                                          r".*data.max_tokens_per_batch=3000000000 is more than 2\^31-1"):
        composed(["data.max_seq_len=3000000000", "data.max_tokens_per_batch=3000000000"])
    with pytest.raises(ConfigError, match=r"data.overlong_stride=64: .*below data.max_seq_len=64"):
        composed(["data.overlong=split", "data.max_seq_len=64", "data.overlong_stride=64"])
    cfg = composed(["data.overlong=split", "data.max_seq_len=1048576", "data.max_tokens_per_batch=1048576"])
    assert (cfg.data.max_seq_len, cfg.data.overlong_stride) == (1 << 20, 0)


@pytest.mark.parametrize(("overlong", "done"), [("truncate", "cut to data.max_seq_len"), ("drop", "dropped")])
def test_overlong_stride_without_split_is_refused(overlong: str, done: str) -> None:
    """data.overlong_stride was ignored unless data.overlong=split: long examples were cut or dropped, not
    windowed with the overlap asked for."""
    with pytest.raises(ConfigError, match=rf"data.overlong_stride=16 applies to data.overlong=split only; with "
                                          rf"data.overlong={overlong} it is ignored and longer examples are {done}\."
                                          r"\n\s*Fix: add data.overlong=split"):
        composed([f"data.overlong={overlong}", "data.overlong_stride=16"])
    assert composed(["data.overlong=split", "data.overlong_stride=16"]).data.overlong_stride == 16


@pytest.mark.parametrize(("override", "problem"), [
    ("trainer.devices=0", r"trainer.devices=0 must be at least 1"),
    ("trainer.devices=-1", r"trainer.devices=-1 must be at least 1 \(-1, every visible GPU, is for GPUs\)"),
    ("trainer.devices=abc", r"trainer.devices='abc' is not a number of devices"),
    ("trainer.devices=[0,1]", r"trainer.devices=\[0, 1\]: a list picks GPUs by index; on CPU"),
    ("trainer.num_nodes=0", r"trainer.num_nodes=0 must be positive"),
])
def test_a_number_of_devices_lightning_would_refuse_is_refused_before_the_model_loads(override: str,
                                                                                       problem: str) -> None:
    # Lightning checks trainer.devices only when the Trainer is built, after the model has loaded and been
    # evaluated, and then with a traceback
    with pytest.raises(ConfigError, match=rf"(?s){problem}.*Fix: trainer.devices=N"
                                          if "devices" in override else problem):
        composed(["trainer=cpu", override])


def test_the_numbers_of_devices_lightning_takes_pass_the_checks() -> None:
    """The other side of the refusals above (once, not for each refused value: a compose takes about 0.2 s)."""
    for ok in ("trainer.devices=2", "trainer.devices=auto", "trainer.devices='2'"):
        assert composed(["trainer=cpu", ok]).trainer.devices in (2, "2", "auto")
    assert composed(["trainer=gpu", "trainer.devices=[0,1]"]).trainer.devices == [0, 1]
    assert composed(["trainer=gpu", "trainer.devices=-1"]).trainer.devices == -1


def test_every_chat_template_preset_the_config_accepts_has_its_jinja() -> None:
    from bamba_ft.config.schema import CHAT_TEMPLATE_PRESETS
    from bamba_ft.data.templates import PRESETS

    assert list(PRESETS) == list(CHAT_TEMPLATE_PRESETS)


def test_chat_template_takes_inline_jinja_a_file_or_a_preset(tmp_path: Path) -> None:
    from bamba_ft.data.templates import PRESETS, resolve_chat_template

    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = tmp_path / "t.jinja"
    path.write_text(inline)
    assert resolve_chat_template(inline) == resolve_chat_template(str(path)) == inline
    assert resolve_chat_template("chatml") == PRESETS["chatml"]
    assert composed([f"data.chat_template={path}"]).data.chat_template == str(path)
    with pytest.raises(ConfigError, match=r"data.chat_template='chatlm' is neither a preset .*Did you mean 'chatml'"
                                          r".*Presets: bamba_ft, chatml"):
        composed(["data.chat_template=chatlm"])
    with pytest.raises(ConfigError, match=r"data.chat_template=.*missing.jinja: no such file"):
        composed([f"data.chat_template={tmp_path / 'missing.jinja'}"])


def test_sources_are_checked_as_a_whole(data_files: Path) -> None:
    with pytest.raises(ConfigError, match=r"(?s)data.source=x.jsonl and data.sources are both set.*weights \[0.7, None\]"
                                          r".*data.sources\[1\].source is empty.*data.sources\[1\].format='chat'"):
        composed(["data=file", "data.source=x.jsonl",
                  "data.sources=[{source: a.jsonl, weight: 0.7}, {source: '', format: chat}]"])
    cfg = composed(["data.sources=[{source: a.jsonl, weight: 0.7, columns: {q: prompt}}, {source: b.jsonl, weight: 0.3}]"])
    assert cfg.data.sources[0].columns == {"q": "prompt"} and cfg.data.sources[1].weight == 0.3
    # a validation split named beside sources was ignored: each source's hold-out was scored instead
    with pytest.raises(ConfigError, match=r"(?s)data.val_split=test with data.sources: .* would be ignored.*"
                                          r"Fix: name the validation data in data.val_source"):
        composed(["data=file", "data.sources=[{source: a.jsonl}]", "data.val_split=test"])
    composed(["data=file", "data.sources=[{source: a.jsonl}]", "data.val_source=b.jsonl", "data.val_split=test"])


@pytest.mark.parametrize("override,problem", [
    # a missing data file failed only after the model and its adapters were built (minutes for a 9B model)
    ("data.source=missing.jsonl", "data.source=missing.jsonl: no such file or directory"),
    # a missing file of another data suffix went to the Hub as a dataset id
    ("data.source=train.txt", "data.source=train.txt: no such file or directory"),
    ("data.val_source=./held/val.jsonl", "data.val_source=./held/val.jsonl: no such file or directory"),
    ("data.sources=[{source: a.jsonl}, {source: out/gone}]", "data.sources[1].source=out/gone: no such file"),
    # ./out exists, so out/nomodel is a path: it went to the Hub as an id (about 30 s of retried requests)
    ("model.name_or_path=out/nomodel", "model.name_or_path=out/nomodel: no such directory"),
    ("model.tokenizer='~/no_such_bamba_ft_tokenizer'", "model.tokenizer=~/no_such_bamba_ft_tokenizer: no such directory ("),
])
def test_a_local_path_that_does_not_exist_is_refused_with_its_key_and_fix(override: str, problem: str,
                                                                        data_files: Path) -> None:
    (data_files / "out").mkdir()
    data = [] if override.startswith("model.") else ["data=file", "data.source=train.jsonl"]
    if override.startswith("data.sources"):
        data = ["data=file"]
    with pytest.raises(ConfigError, match=r"(?s)1 problem in .*" + re.escape(problem) + r".*\n.*Fix: point"):
        composed([*data, override])


def test_the_local_path_rule_leaves_hub_ids_builtins_and_existing_paths_alone(data_files: Path) -> None:
    from bamba_ft.config.schema import looks_local

    (data_files / "out" / "model").mkdir(parents=True)
    for value in ("org/name", "ibm-granite/granite-4.0-h-tiny", "imdb", "builtin", "builtin:tiny"):
        assert not looks_local(value), value  # a Hub id (no ./org here) or what bamba_ft ships
    for value in ("./x", "../x", "/x", "~/x", "x.jsonl", "X.PARQUET", "out/model", "out/missing"):
        assert looks_local(value), value
    cfg = composed(["data=file", "data.source=org/data", "data.val_source=out/model", "model.name_or_path=out/model",
                    f"model.tokenizer={data_files / 'out'}"])
    assert (cfg.data.source, cfg.model.name_or_path) == ("org/data", "out/model")
    composed(["data=file", "data.sources=[{source: a.jsonl}, {source: org/data}]", "data.streaming=true"])
    # the refusal names the local directory that made the value a path, and how to reach the Hub id instead
    with pytest.raises(ConfigError, match=r"(?s)out/missing: no such directory.*\./out exists here.*run from a "
                                          r"directory without \./out"):
        composed(["model.name_or_path=out/missing"])


def test_a_missing_local_path_read_from_elsewhere_is_refused_without_asking_the_hub(
        data_files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A path that skipped validate (an adapter's base_model_name_or_path, a run's saved data config) is refused
    where it is read, before transformers or datasets take it for a Hub id."""
    import transformers

    from bamba_ft.config.schema import ModelConfig
    from bamba_ft.data import load
    from bamba_ft.errors import DataError, ModelError
    from bamba_ft.model.build import load_config, load_tokenizer

    def no_hub(*args: object, **kwargs: object) -> None:
        raise AssertionError("asked the Hub")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    monkeypatch.setattr(load, "_hub_unreachable", no_hub)
    (data_files / "out").mkdir()
    with pytest.raises(ModelError, match=r"model.name_or_path=out/nomodel: no such directory.*\n.*Fix: point"):
        load_config(ModelConfig(name_or_path="out/nomodel"))
    with pytest.raises(ModelError, match=r"model.tokenizer=\./tok: no such directory"):
        load_tokenizer(ModelConfig(tokenizer="./tok"))
    for source in ("train.txt", "out/data", "./d"):
        with pytest.raises(DataError, match=rf"data.source={re.escape(source)}: no such file or directory"):
            load.load_rows(source, "train", "data.source")
        with pytest.raises(DataError, match=rf"data.source={re.escape(source)}: no such file or directory"):
            load.load_stream(source, "train", "data.source")


@pytest.mark.parametrize("value,expected", [("true", "true"), ("false", "false"), ("auto", "auto"), ("True", "true")])
def test_cuda_graphs_takes_auto_or_a_boolean(value: str, expected: str) -> None:
    assert composed([]).model.cuda_graphs == "auto"
    assert composed([f"model.cuda_graphs={value}"]).model.cuda_graphs == expected
    with pytest.raises(ConfigError, match=r"model.cuda_graphs='sometimes' is not an option.*Valid: auto, true, false"):
        composed(["model.cuda_graphs=sometimes"])


def test_float16_mixed_precision_off_cuda_is_refused_not_switched_to_bf16(tmp_path: Path) -> None:
    from bamba_ft.jobs.runtime import resolve_precision
    from tests.integration.conftest import run_in_process

    with pytest.raises(ConfigError, match=r"16-mixed: float16 mixed precision runs on CUDA only, not on cpu.*\n.*bf16-mixed"):
        resolve_precision("16-mixed", torch.device("cpu"))
    assert resolve_precision("16-mixed", torch.device("cuda", 0)) == "16-mixed"
    assert resolve_precision("auto", torch.device("cpu")) == "32-true"
    with pytest.raises(ConfigError, match="16-mixed"):  # before the model loads: nothing is written
        run_in_process(["trainer=cpu", "trainer.precision=16-mixed", "logger=none"], tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "adapter").exists()


def test_export_settings_that_would_fail_after_the_merge_are_refused_first() -> None:
    cfg = RunConfig()
    cfg.export.push_to_hub, cfg.export.repo_id, cfg.export.max_rel_diff = True, "not/a/valid//id", -1.0
    with pytest.raises(ConfigError, match=r"(?s)export.repo_id=not/a/valid//id is not a Hub repository id.*"
                                          r"export.max_rel_diff=-1.0 must be positive"):
        validate(cfg)
    cfg.export.repo_id, cfg.export.max_rel_diff = "me/bamba-sft", 0.2
    validate(cfg)


def test_wandb_that_cannot_start_is_one_message_before_the_model_loads(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import lightning.pytorch.loggers as pl_loggers

    from tests.integration.conftest import run_in_process

    cfg = RunConfig()
    cfg.logger.wandb = True
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"logger.wandb=true needs the wandb package.*logger=default"):
        validate(cfg)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else real_find_spec(name, *a))

    class NoKey:  # what wandb raises without a key in a non-interactive shell (or after its network timeout)
        def __init__(self, **kwargs: object) -> None:
            pass

        @property
        def experiment(self) -> None:
            raise RuntimeError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(pl_loggers, "WandbLogger", NoKey)
    loaded = []
    monkeypatch.setattr("bamba_ft.jobs.train._prepare", lambda *a: loaded.append(1))
    with pytest.raises(ConfigError, match=r"could not start a run \(RuntimeError: No API key configured.*\n.*"
                                          r"WANDB_MODE=offline"):
        run_in_process(["trainer=cpu", "logger=wandb"], tmp_path / "run")
    assert not loaded  # refused before the model and data load


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a GPU run on a machine without one")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_gpu_run_without_a_gpu_is_refused_with_its_strategy_on_cpu_processes(strategy: str) -> None:
    from bamba_ft.jobs.runtime import choose_device

    with pytest.raises(ConfigError, match=f"Fix: trainer=cpu .*trainer=cpu trainer.strategy={strategy} trainer.devices=N"):
        choose_device("gpu", "auto", strategy)
