"""``ppo-fast sft`` and ``ppo-fast rm``: each end to end on a slice of the sample data, the token
convention and the loss mask, the data formats, and every bad input."""

import csv
import json
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from ppo_fast.trainer import rundir  # noqa: E402
from ppo_fast.trainer.config import ConfigError, PPOConfig, check_files  # noqa: E402
from ppo_fast.trainer.data import (load_records, preference_pairs, prompt_texts,  # noqa: E402
                                   render_prompt, sft_examples)
from ppo_fast.trainer.prompts import load_prompts  # noqa: E402
from ppo_fast.trainer.supervised import RMConfig, SFTConfig, run_rm, run_sft, sft_batch  # noqa: E402

from helpers import subprocess_env, tiny_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "sample"
BASE = SAMPLE / "base"
QUICK = dict(max_steps=3, batch_size=8, micro_batch_size=4, eval_fraction=0.25, eval_every=2)


def _rows(name: str, n: int | None = None) -> list[dict]:
    lines = (SAMPLE / name).read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _tokenizer():
    return transformers.AutoTokenizer.from_pretrained(BASE)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sft_then_rm_write_loadable_models_and_their_run_files(tmp_path):
    data = _jsonl(tmp_path / "sft.jsonl", _rows("sft.jsonl", 40))
    summary = run_sft(SFTConfig(model=str(BASE), data=data, output_dir=str(tmp_path), run_name="sft",
                                **QUICK))
    run = tmp_path / "sft"
    assert json.loads((run / "summary.json").read_text()) == summary
    assert json.loads((run / "config.json").read_text())["data"] == data
    assert (summary["steps"], summary["train_rows"], summary["eval_rows"]) == (3, 30, 10)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 3]
    assert all("loss" in r for r in rows[1:])
    assert not (run / ".model.partial").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(run / "model")
    assert model.config.vocab_size == transformers.AutoTokenizer.from_pretrained(run / "model").vocab_size

    # The same seed gives the same run.
    run_sft(SFTConfig(model=str(BASE), data=data, output_dir=str(tmp_path), run_name="again", **QUICK))
    assert _metrics(tmp_path / "again") == rows

    prefs = _jsonl(tmp_path / "prefs.jsonl", _rows("prefs.jsonl", 40))
    summary = run_rm(RMConfig(model=str(run / "model"), data=prefs, output_dir=str(tmp_path), run_name="rm",
                              **QUICK))
    for key in ("eval_accuracy_before", "eval_accuracy_after", "eval_loss_after", "seconds"):
        assert summary[key] is not None, key
    reward_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model")
    assert reward_model.config.num_labels == 1
    assert reward_model.config.pad_token_id == _tokenizer().pad_token_id


def test_labels_are_the_response_tokens_and_eos_only(tmp_path):
    tokenizer = _tokenizer()
    data = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "3+4=", "response": "7"},
                                           {"prompt": "9+9=", "response": "18"}])
    short, long = sft_examples(data, tokenizer, max_len=64)
    prompt = tokenizer.encode("3+4=", add_special_tokens=True)
    assert prompt[0] == tokenizer.bos_token_id
    assert short.ids == prompt + tokenizer.encode("7", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert short.prompt_len == len(prompt)
    ids, mask, labels = sft_batch([short, long], tokenizer.pad_token_id)
    assert ids.shape == (2, 8) and mask[0].tolist() == [0] + [1] * 7
    assert labels[0].tolist() == [-100] * 6 + ids[0, 6:].tolist()  # pad, <bos> 3 + 4 = | 7 <eos>
    assert labels[1].tolist() == [-100] * 5 + ids[1, 5:].tolist()  # <bos> 9 + 9 = | 1 8 <eos>
    assert labels[1, -1].item() == tokenizer.eos_token_id


def test_chat_records_give_the_ids_of_their_rendered_prompt_and_response(tmp_path):
    tokenizer = _tokenizer()
    chats = _rows("chat_sft.jsonl")
    assert any(len(row["messages"]) > 2 for row in chats)
    plain = [{"prompt": render_prompt(tokenizer, row["messages"][:-1]),
              "response": row["messages"][-1]["content"]} for row in chats]
    chat_examples = sft_examples(str(SAMPLE / "chat_sft.jsonl"), tokenizer, max_len=64)
    assert chat_examples == sft_examples(_jsonl(tmp_path / "plain.jsonl", plain), tokenizer, max_len=64)

    as_messages = [{"prompt": [{"role": "user", "content": row["prompt"]}],
                    "chosen": [{"role": "assistant", "content": row["chosen"]}],
                    "rejected": [{"role": "assistant", "content": row["rejected"]}]}
                   for row in _rows("prefs.jsonl", 8)]
    assert (preference_pairs(_jsonl(tmp_path / "chat_prefs.jsonl", as_messages), tokenizer, 64)
            == preference_pairs(_jsonl(tmp_path / "prefs.jsonl", _rows("prefs.jsonl", 8)), tokenizer, 64))

    # Prompts from conversations: the final assistant turn is left out.
    prompts = prompt_texts(str(SAMPLE / "chat_sft.jsonl"), tokenizer)
    assert prompts == [row["prompt"] for row in plain]
    with pytest.raises(ConfigError, match="chat messages need a tokenizer's chat template"):
        prompt_texts(str(SAMPLE / "chat_sft.jsonl"))


def test_csv_parquet_and_json_load_the_same_records_as_jsonl(tmp_path):
    from datasets import Dataset

    rows = _rows("sft.jsonl", 30)
    with open(tmp_path / "sft.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "response"])
        writer.writeheader()
        writer.writerows(rows)
    # A spreadsheet export: a byte-order mark first.
    (tmp_path / "sft_bom.csv").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "sft.csv").read_bytes())
    Dataset.from_list(rows).to_parquet(tmp_path / "sft.parquet")
    (tmp_path / "sft.json").write_text(json.dumps(rows))
    jsonl = _jsonl(tmp_path / "sft.jsonl", rows)
    expected = load_records(jsonl, (("prompt", "response"),), "examples")
    assert expected.lines == list(range(1, 31))
    for name, lines in (("sft.csv", range(2, 32)), ("sft_bom.csv", range(2, 32)), ("sft.parquet", None),
                        ("sft.json", None)):
        records = load_records(str(tmp_path / name), (("prompt", "response"),), "examples")
        assert (records.rows, records.columns) == (expected.rows, expected.columns), name
        assert records.lines == (list(lines) if lines else None), name
    assert sft_examples(str(tmp_path / "sft.csv"), _tokenizer(), 64) == sft_examples(jsonl, _tokenizer(), 64)

    prompts = _rows("prompts.jsonl")
    Dataset.from_list(prompts).to_parquet(tmp_path / "prompts.parquet")
    (tmp_path / "prompts.txt").write_text("".join(row["prompt"] + "\n" for row in prompts))
    expected = [row["prompt"] for row in prompts]
    assert load_prompts(str(SAMPLE / "prompts.jsonl")) == expected
    assert load_prompts(str(tmp_path / "prompts.parquet")) == expected
    assert load_prompts(str(tmp_path / "prompts.txt")) == expected
    chat = tmp_path / "chat_prompts.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "1+2="}]}\n{"messages": []}\n')
    with pytest.raises(ConfigError, match=r"chat_prompts.jsonl: line 2: messages has no user turn before the "
                                          r"assistant's answer \(before it: nothing\)"):
        load_prompts(str(chat), _tokenizer())


def _bad_data(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _sums(first, last):
    """JSON Lines of sums ``i+1=`` and their answers, for i in [first, last)."""
    return "".join(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) + "\n" for i in range(first, last))


def _chat(*roles_and_contents):
    pairs = zip(roles_and_contents[::2], roles_and_contents[1::2])
    return json.dumps({"messages": [{"role": role, "content": content} for role, content in pairs]}) + "\n"


def _parquet(tmp_path, rows):
    """``rows`` (a list of dicts, or a dict of columns) as a Parquet file."""
    import pyarrow
    import pyarrow.parquet

    table = pyarrow.Table.from_pylist(rows) if isinstance(rows, list) else pyarrow.table(
        {name: pyarrow.array(values, pyarrow.string()) for name, values in rows.items()})
    pyarrow.parquet.write_table(table, tmp_path / "sft.parquet")
    return str(tmp_path / "sft.parquet")


def _bad_bytes(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


BAD_DATA = [
    (lambda d: str(d / "missing.jsonl"), r"data file .*missing.jsonl does not exist"),
    (lambda d: _bad_data(d, "sft.tsv", "prompt\tresponse\n"),
     r"sft.tsv: unsupported file type '.tsv'; .* are read from .jsonl, .json, .parquet, .csv files"),
    (lambda d: _bad_data(d, "sft.jsonl", ""), r"sft.jsonl is empty"),
    (lambda d: _bad_data(d, "sft.csv", "prompt,response\n"), r"sft.csv holds no rows"),
    (lambda d: _bad_data(d, "sft.jsonl", '{"prompt": "1+2=", "answer": "3"}\n'),
     r"lacks the column\(s\) response for SFT examples .*; it has prompt, answer\. "
     r"Accepted column sets: prompt \+ response or messages"),
    (lambda d: _bad_data(d, "sft.jsonl", '{"prompt": "1+2=", "response": "3"}\n' * 3
                         + '{"prompt": "1+2=", "response": "3333333333"}\n'),
     r"sft.jsonl: line 4 is 16 tokens \(prompt and response with EOS\), longer than max_len=12"),
    (lambda d: _bad_data(d, "sft.jsonl", '{"prompt": "1+2=", "response": "3"}\n{"prompt": "1+2="}\n'),
     r"sft.jsonl: line 2 has no response \(it has prompt\)"),
    (lambda d: _bad_data(d, "sft.jsonl", '{"prompt": "1+2=", "response": null}\n'),
     r"sft.jsonl: line 1: response must be text, got NoneType None"),
    # One number among texts is named at its own line, with the value the file holds (Arrow's
    # type inference made the whole column numbers and named the first row).
    (lambda d: _bad_data(d, "sft.jsonl", _sums(0, 3) + "\n" + _sums(3, 5) + '{"prompt": "5+1=", "response": 6}\n'),
     r"sft.jsonl: line 7: response must be text, got int 6$"),
    (lambda d: _bad_data(d, "sft.json", json.dumps([json.loads(line) for line in _sums(0, 5).splitlines()]
                                                   + [{"prompt": "5+1=", "response": 6}])),
     r"sft.json: row 5 \(counting from 0\): response must be text, got int 6$"),
    (lambda d: _bad_data(d, "sft.jsonl", _sums(0, 2) + '{"prompt": "2+1=", "response": ["3"]}\n'),
     r"sft.jsonl: line 3: response must be text, got list \['3'\]$"),
    (lambda d: _parquet(d, [{"prompt": "1+2=", "response": 3}, {"prompt": "2+2=", "response": 4}]),
     r"sft.parquet: row 0 \(counting from 0\): response must be text, got int 3$"),
    (lambda d: _parquet(d, {"prompt": [], "response": []}), r"sft.parquet holds no rows"),
    (lambda d: _bad_data(d, "sft.csv", "prompt,response\n1+2=,3\n2+2=,4,5\n"),
     r"sft.csv: line 3 has 3 cells, the header has 2 \(prompt, response\); quote a cell that holds a comma"),
    (lambda d: _bad_data(d, "sft.jsonl", '"1+2=3"\n'),
     r"sft.jsonl: line 1 is a string '1\+2=3', not an object of columns"),
    # An answer to no one: no user turn before it.
    (lambda d: _bad_data(d, "sft.jsonl", '{"messages": [{"role": "assistant", "content": "3"}]}\n'),
     r"sft.jsonl: line 1: messages has no user turn before the assistant's answer \(before it: nothing\)"),
    (lambda d: _bad_data(d, "sft.jsonl", _chat("user", "1+2=", "assistant", "3")
                         + _chat("system", "add", "assistant", "3")),
     r"sft.jsonl: line 2: messages has no user turn before the assistant's answer \(before it: 'system'\)"),
    (lambda d: _bad_data(d, "sft.jsonl", '{"messages": [{"role": "user", "content": "1+2="}]}\n'),
     r"sft.jsonl: line 1: messages must end with the assistant's message .* it ends with 'user'"),
    (lambda d: _bad_data(d, "sft.jsonl", '{"prompt": "1+2=", "response": "3"\n'),
     r"sft.jsonl: line 1, column 35 is not valid JSON \(Expecting ',' delimiter\); a .jsonl file holds one JSON "
     "object per line"),
    (lambda d: (d / "data.jsonl").mkdir() or str(d / "data.jsonl"), r"data file .*data.jsonl is a directory"),
    (lambda d: _bad_bytes(d, "sft.jsonl", b'{"prompt": "1+2=", "response": "3"}\n{"prompt": "1\xff", "response": "3"}\n'),
     r"sft.jsonl: line 2, byte 14 is not UTF-8 \(invalid start byte: b'\\xff'\); save the file as UTF-8"),
    (lambda d: _bad_bytes(d, "sft.csv", b"prompt,response\n1+2=,3\n\xe9,4\n"),
     r"sft.csv: line 3, byte 1 is not UTF-8"),
]


def test_chat_rows_need_a_user_turn_and_a_failing_chat_template_names_the_row(tmp_path):
    lm, rm = tiny_model_dir(tmp_path / "lm"), tiny_model_dir(tmp_path / "rm", reward=True)
    user, system = {"role": "user", "content": "1+2="}, {"role": "system", "content": "add"}
    three, four = {"role": "assistant", "content": "3"}, {"role": "assistant", "content": "4"}
    prefs = _jsonl(tmp_path / "prefs.jsonl", [{"chosen": [user, three], "rejected": [user, four]},
                                              {"chosen": [three], "rejected": [four]}])
    with pytest.raises(ConfigError, match=r"prefs.jsonl: line 2: chosen has no user turn before the assistant's "
                                          r"answer \(before it: nothing\)"):
        run_rm(RMConfig(model=lm, data=prefs, output_dir=str(tmp_path / "runs")))
    prefs = _jsonl(tmp_path / "prefs.jsonl", [{"prompt": [system], "chosen": [three], "rejected": [four]}])
    with pytest.raises(ConfigError, match=r"prefs.jsonl: line 1: prompt \+ chosen has no user turn before the "
                                          r"assistant's answer \(before it: 'system'\)"):
        run_rm(RMConfig(model=lm, data=prefs, output_dir=str(tmp_path / "runs")))
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"messages": [user]}, {"messages": [system, three]}])
    with pytest.raises(ConfigError, match=r"prompts_file: .*prompts.jsonl: line 2: messages has no user turn before "
                                          r"the assistant's answer \(before it: 'system'\)"):
        check_files(PPOConfig(policy_model=lm, reward=rm, prompts_file=prompts, output_dir=str(tmp_path)))

    # A template that refuses a row by its own rule: the error names the file, the row and why.
    strict = Path(shutil.copytree(BASE, tmp_path / "strict"))
    (strict / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if not m['content'] %}{{ raise_exception('a turn is empty') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}")
    data = _jsonl(tmp_path / "sft.jsonl", [{"messages": [user, three]},
                                           {"messages": [{"role": "user", "content": ""}, three]}])
    with pytest.raises(ConfigError, match=r"sft.jsonl: line 2: the tokenizer's chat template cannot render the turns "
                                          r"\('user'\): TemplateError: a turn is empty"):
        run_sft(SFTConfig(model=str(strict), data=data, output_dir=str(tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()


def test_a_prompt_file_that_is_a_directory_or_not_utf8_is_named(tmp_path):
    (tmp_path / "prompts.txt").mkdir()
    with pytest.raises(ConfigError, match=r"prompt file .*prompts.txt is a directory"):
        load_prompts(str(tmp_path / "prompts.txt"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("1+2=\n3+4=\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.txt: line 3, byte 4 is not UTF-8"):
        load_prompts(str(bad))


@pytest.mark.parametrize("make, message", BAD_DATA)
def test_bad_data_is_refused_before_any_training(make, message, tmp_path):
    config = SFTConfig(model=str(BASE), data=make(tmp_path), output_dir=str(tmp_path), max_len=12, **QUICK)
    with pytest.raises(ConfigError, match=message):
        run_sft(config)
    assert not any(p.name.startswith("run-") for p in tmp_path.iterdir())  # no run directory made


def test_overwrite_refuses_to_delete_the_runs_own_inputs(tmp_path):
    run_dir = tmp_path / "r"
    (run_dir / "inputs").mkdir(parents=True)
    data = run_dir / "inputs" / "sft.jsonl"
    shutil.copy(SAMPLE / "sft.jsonl", data)
    model = run_dir / "inputs" / "base"
    shutil.copytree(BASE, model)
    for inputs, field in ((dict(model=str(BASE), data=str(data)), "data"),
                          (dict(model=str(model), data=str(SAMPLE / "sft.jsonl")), "model")):
        config = SFTConfig(**inputs, output_dir=str(tmp_path), run_name="r", overwrite=True, **QUICK)
        with pytest.raises(ConfigError, match=rf"overwrite would delete {field}=.* lies inside the run directory"):
            run_sft(config)
    assert data.read_bytes() == (SAMPLE / "sft.jsonl").read_bytes() and (model / "config.json").is_file()
    reward = f"0.5*{model},0.5*{BASE}"
    with pytest.raises(ConfigError, match=r"overwrite would delete reward="):
        rundir._inputs_outside(PPOConfig(reward=reward), run_dir)


def test_bad_models_configs_and_run_directories(tmp_path):
    prefs = str(SAMPLE / "prefs.jsonl")
    with pytest.raises(ConfigError, match=r"model: .*base holds no weights \(none of model.safetensors, "
                                          r"model.safetensors.index.json, pytorch_model.bin, "
                                          r"pytorch_model.bin.index.json\); a reward model starts from trained weights"):
        run_rm(RMConfig(model=str(BASE), data=prefs, output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"model: .* is not a Hugging Face model directory \(no config.json"):
        run_sft(SFTConfig(model=str(tmp_path), data=prefs, output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="model is required"):
        run_sft(SFTConfig(data=prefs, output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"max_len=65 is more than the model's max_position_embeddings \(64\)"):
        run_sft(SFTConfig(model=str(BASE), data=prefs, output_dir=str(tmp_path), max_len=65))
    with pytest.raises(ConfigError, match=r"batch_size \(6\) must be a multiple of micro_batch_size \(4\)"):
        SFTConfig(batch_size=6, micro_batch_size=4)
    with pytest.raises(ConfigError, match=r"eval_fraction must be in \[0, 1\), got 1.0"):
        RMConfig(eval_fraction=1)

    data = _jsonl(tmp_path / "sft.jsonl", _rows("sft.jsonl", 40))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"run directory .*taken exists already"):
        run_sft(SFTConfig(model=str(BASE), data=data, output_dir=str(tmp_path), run_name="taken", **QUICK))
    with pytest.raises(ConfigError, match=r"40 rows; 4 are left for training after holding out 36"):
        run_sft(SFTConfig(model=str(BASE), data=data, output_dir=str(tmp_path), run_name="few",
                          **{**QUICK, "eval_fraction": 0.9}))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ppo_fast.cli", *args], capture_output=True, text=True,
                          env=subprocess_env(), cwd=ROOT, timeout=300)


def test_help_lists_every_field_and_errors_exit_with_status_2(tmp_path):
    for command, config_class in (("sft", SFTConfig), ("rm", RMConfig)):
        out = _cli(command, "--help")
        assert out.returncode == 0, out.stderr
        for f in fields(config_class):
            assert f"--{f.name.replace('_', '-')}" in out.stdout, (command, f.name)
    out = _cli("rm", "--model", str(BASE), "--data", str(SAMPLE / "prefs.jsonl"), "--output-dir", str(tmp_path))
    assert out.returncode == 2
    assert "ppo-fast: model:" in out.stderr and "holds no weights" in out.stderr
