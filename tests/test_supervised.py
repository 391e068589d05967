"""``ppo-fast sft`` and ``ppo-fast rm``: each end to end on a slice of the sample data, the token
convention and the loss mask, the data formats, and every bad input."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from ppo_fast.trainer import CheckpointError, rundir  # noqa: E402
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


@pytest.mark.slow
def test_help_lists_every_field_and_errors_exit_with_status_2(tmp_path):
    for command, config_class in (("sft", SFTConfig), ("rm", RMConfig)):
        out = _cli(command, "--help")
        assert out.returncode == 0, out.stderr
        for f in fields(config_class):
            assert f"--{f.name.replace('_', '-')}" in out.stdout, (command, f.name)
    out = _cli("rm", "--model", str(BASE), "--data", str(SAMPLE / "prefs.jsonl"), "--output-dir", str(tmp_path))
    assert out.returncode == 2
    assert "ppo-fast: model:" in out.stderr and "holds no weights" in out.stderr


# --------------------------------------------------------------------------------------------
# Checkpoints and resume: a stopped run continues to the weights and rows of one never stopped
# --------------------------------------------------------------------------------------------

# Two steps a pass (8 training rows of 10, batches of 4): steps 3-4 are the second pass, step 5 the
# third. (The command-line tests of the slow tier accumulate gradients over micro-batches.)
RESUMABLE_RUN = dict(max_steps=5, batch_size=4, micro_batch_size=4, eval_fraction=0.2, eval_every=2,
                     save_every=2)


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "model" / "model.safetensors")


def _assert_same_run(run_dir: Path, straight: Path):
    ours, theirs = _weights(run_dir), _weights(straight)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs), \
        [name for name in theirs if not torch.equal(ours[name], theirs[name])]
    assert _metrics(run_dir) == _metrics(straight)


def _sending(signum, at_step: int, said: list):
    """A log that records every line and sends this process ``signum`` once the row of
    ``at_step`` is logged: a Ctrl-C (or a kill) in the middle of the run."""
    def log(line):
        said.append(str(line))
        if str(line).startswith(f"step {at_step} "):
            os.kill(os.getpid(), signum)
    return log


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An sft run and an rm run on its model, neither stopped."""
    out = tmp_path_factory.mktemp("straight")
    sft = dict(model=str(BASE), data=_jsonl(out / "sft.jsonl", _rows("sft.jsonl", 10)), output_dir=str(out),
               **RESUMABLE_RUN)
    run_sft(SFTConfig(**sft, run_name="sft"))
    rm = dict(model=str(out / "sft" / "model"), data=_jsonl(out / "prefs.jsonl", _rows("prefs.jsonl", 10)),
              output_dir=str(out), **RESUMABLE_RUN)
    run_rm(RMConfig(**rm, run_name="rm"))
    return {"sft": sft, "rm": rm, "dir": out}


@pytest.mark.parametrize("command, signum", [("sft", signal.SIGINT), ("rm", signal.SIGTERM)])
def test_a_run_stopped_by_a_signal_saves_and_resumes_to_the_same_weights_and_rows(
        straight, tmp_path, command, signum):
    config_class, run = {"sft": (SFTConfig, run_sft), "rm": (RMConfig, run_rm)}[command]
    fields = {**straight[command], "output_dir": str(tmp_path), "run_name": "r"}
    said = []
    # Stopped in the middle of the second pass: the resume starts inside a pass.
    assert run(config_class(**fields), log=_sending(signum, 3, said)) == {"interrupted_at": 3}
    assert f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint" in "\n".join(said)
    assert said[-1] == (f"{command}: interrupted; step 3 of 5 saved in {tmp_path / 'r' / 'checkpoints' / 'step3'}; "
                        f"continue with ppo-fast {command} --output-dir {tmp_path} --run-name r --resume true")
    assert [r["step"] for r in _metrics(tmp_path / "r")] == [0, 1, 2, 3]
    assert not (tmp_path / "r" / "model").exists() and not (tmp_path / "r" / "summary.json").exists()

    said = []
    summary = run(config_class(**fields, resume=True), log=said.append)
    assert f"{command}: resumed from step 3 of 5" in "\n".join(said)
    assert summary["steps"] == 5
    _assert_same_run(tmp_path / "r", straight["dir"] / command)


def test_a_crashed_run_resumes_from_its_newest_intact_checkpoint(straight, tmp_path):
    fields = {**straight["sft"], "output_dir": str(tmp_path), "run_name": "r"}

    def crash(line):
        if str(line).startswith("step 5 "):
            raise RuntimeError("the machine went away")

    with pytest.raises(RuntimeError, match="the machine went away"):
        run_sft(SFTConfig(**fields), log=crash)
    checkpoints = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step*")) == ["step2", "step4"]
    assert [r["step"] for r in _metrics(tmp_path / "r")] == [0, 1, 2, 3, 4, 5]  # 5 not saved
    # A byte of a checkpoint flipped on disk: its sha256 no longer matches the manifest.
    def flip_a_byte(step):
        path = checkpoints / f"step{step}" / "model" / "mp_rank_00_model_states.pt"
        intact = path.read_bytes()
        path.write_bytes(intact[:len(intact) // 2] + bytes([intact[len(intact) // 2] ^ 0xFF])
                         + intact[len(intact) // 2 + 1:])
        return path, intact

    weights, _ = flip_a_byte(4)
    older, intact = flip_a_byte(2)
    with pytest.raises(CheckpointError, match=rf"(?s)no intact checkpoint.*{weights}.*{older}"):
        run_sft(SFTConfig(**fields, resume=True), log=lambda *_: None)
    older.write_bytes(intact)

    said = []
    run_sft(SFTConfig(**fields, resume=True), log=said.append)
    text = "\n".join(said)
    assert f"checkpoint step4 is damaged, passed over: {weights}: sha256 differs" in text
    assert "sft: resumed from step 2 of 5" in text
    _assert_same_run(tmp_path / "r", straight["dir"] / "sft")


def test_resuming_a_finished_run_changes_nothing_and_says_so(straight, tmp_path):
    shutil.copytree(straight["dir"] / "sft", tmp_path / "sft")
    before = {p: p.read_bytes() for p in (tmp_path / "sft").rglob("*") if p.is_file()}
    said = []
    config = SFTConfig(**{**straight["sft"], "output_dir": str(tmp_path)}, run_name="sft", resume=True)
    assert run_sft(config, log=said.append) == {"finished_at": 5}
    assert said == [f"sft: run 'sft' has finished its 5 steps; nothing to do (its model: {tmp_path / 'sft' / 'model'})"]
    assert {p: p.read_bytes() for p in (tmp_path / "sft").rglob("*") if p.is_file()} == before


def test_ctrl_c_before_the_first_step_leaves_the_run_name_free(straight, tmp_path):
    fields = {**straight["sft"], "output_dir": str(tmp_path), "run_name": "r"}

    def ctrl_c_while_building(line):
        if "holds no weights" in str(line):  # said while the model is built
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        run_sft(SFTConfig(**fields), log=ctrl_c_while_building)
    assert not (tmp_path / "r").exists()
    run_sft(SFTConfig(**{**fields, "max_steps": 1}), log=lambda *_: None)  # no --overwrite needed


@pytest.mark.slow
def test_an_interrupted_evaluation_leaves_its_run_name_free(straight, tmp_path, monkeypatch):
    """eval has no checkpoints: it writes its files when it ends (as its --help says)."""
    from ppo_fast.hybrid import HybridEngine
    from ppo_fast.trainer.evaluation import EvalConfig, evaluate

    config = EvalConfig(policy=str(straight["dir"] / "sft" / "model"), prompts=str(SAMPLE / "eval_prompts.jsonl"),
                        gold=f"{SAMPLE / 'reward.py'}:exact_sum", num_prompts=2, max_new_tokens=4,
                        output_dir=str(tmp_path), run_name="e")
    generate = HybridEngine.generate

    def ctrl_c(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(HybridEngine, "generate", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        evaluate(config, log=lambda *_: None)
    assert not any((tmp_path / "e").iterdir())
    monkeypatch.setattr(HybridEngine, "generate", generate)
    evaluate(config, log=lambda *_: None)
    assert (tmp_path / "e" / "summary.json").is_file()


def test_help_says_what_resume_and_overwrite_promise_for_each_command():
    from ppo_fast.trainer.config import field_docs
    from ppo_fast.trainer.evaluation import EvalConfig

    for config_class in (SFTConfig, RMConfig, PPOConfig):
        docs = field_docs(config_class)
        assert "from its newest intact checkpoint" in docs["resume"], config_class
        assert all(name in docs["resume"] for name in config_class.RESUMABLE), (config_class, docs["resume"])
        assert "refused when the run would delete its own" in docs["overwrite"], config_class
    assert "There is no resume" in field_docs(EvalConfig)["overwrite"]
    assert not hasattr(EvalConfig(policy="p", prompts="q", gold="g"), "resume")


def test_resume_keeps_the_runs_settings_from_the_command_line(tmp_path):
    from argparse import ArgumentParser

    from ppo_fast.trainer.config import add_arguments, from_args

    run = tmp_path / "r"
    run.mkdir()
    data = str(SAMPLE / "sft.jsonl")
    (run / "config.json").write_text(json.dumps(SFTConfig(model=str(BASE), data=data, lr=0.01).to_dict()))
    parser = ArgumentParser()
    add_arguments(parser, SFTConfig)
    location = ["--output-dir", str(tmp_path), "--run-name", "r", "--resume", "true"]
    config = from_args(parser.parse_args([*location, "--eval-every", "7"]), SFTConfig)
    assert (config.model, config.data, config.lr, config.eval_every, config.resume) == (str(BASE), data, 0.01, 7, True)
    with pytest.raises(ConfigError, match=r"these differ from them: lr=0.5 \(the run has 0.01\)\. Start a new run to "
                                          r"change them \(resumable: save_every, eval_every\)"):
        from_args(parser.parse_args([*location, "--lr", "0.5"]), SFTConfig)
    with pytest.raises(ConfigError, match="resume needs run_name"):
        RMConfig(resume=True)


def _cli_run(tmp_path, command, *flags, launcher=None):
    """``ppo-fast <command> <flags>`` started as a terminal would: its own process group, which a
    Ctrl-C signals as a whole (the launcher and its ranks alike)."""
    cmd = [*launcher, "--module", "ppo_fast.cli"] if launcher else [sys.executable, "-m", "ppo_fast.cli"]
    return subprocess.Popen([*cmd, command, *flags, "--output-dir", str(tmp_path)], env=subprocess_env(
        OMP_NUM_THREADS="1"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)


def _signal_after(proc, metrics: Path, rows: int, signum):
    """Send the process group ``signum`` once ``rows`` metrics rows are written; the output after
    every process of the group has ended."""
    import time

    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the signal: " + proc.stdout.read()[-3000:]
    os.killpg(proc.pid, signum)
    out, _ = proc.communicate(timeout=600)  # EOF once every process holding the pipe is gone
    return out


LONGER = ["--max-steps", "30", "--batch-size", "4", "--micro-batch-size", "2", "--eval-fraction", "0.2",
          "--eval-every", "10", "--save-every", "4"]


@pytest.mark.slow
def test_ctrl_c_and_kill_9_on_the_command_line_then_resume_with_only_the_run_name(tmp_path):
    data = ["--data", _jsonl(tmp_path / "sft.jsonl", _rows("sft.jsonl", 40))]
    model = ["--model", str(BASE)]
    straight = _cli_run(tmp_path, "sft", *model, *data, *LONGER, "--run-name", "straight")
    assert straight.wait(timeout=600) == 0, straight.stdout.read()[-3000:]

    stopped = _cli_run(tmp_path, "sft", *model, *data, *LONGER, "--run-name", "ctrl-c")
    out = _signal_after(stopped, tmp_path / "ctrl-c" / "metrics.jsonl", 6, signal.SIGINT)
    assert stopped.returncode == 130, out[-3000:]
    assert "SIGINT: finishing this step, then saving a checkpoint" in out and "Traceback" not in out, out[-3000:]
    (line,) = [line for line in out.splitlines() if line.startswith("sft: interrupted; step")]
    assert line.endswith(f"continue with ppo-fast sft --output-dir {tmp_path} --run-name ctrl-c --resume true")

    killed = _cli_run(tmp_path, "sft", *model, *data, *LONGER, "--run-name", "killed")
    _signal_after(killed, tmp_path / "killed" / "metrics.jsonl", 11, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    latest = (tmp_path / "killed" / "checkpoints" / "latest").read_text()
    assert latest in ("step8", "step12"), latest

    for name in ("ctrl-c", "killed"):
        resumed = _cli_run(tmp_path, "sft", "--run-name", name, "--resume", "true")
        out, _ = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, out[-3000:]
        assert "sft: resumed from step" in out
        _assert_same_run(tmp_path / name, tmp_path / "straight")


@pytest.mark.slow
def test_ctrl_c_on_two_ranks_under_the_deepspeed_launcher_then_resume(tmp_path):
    """Ctrl-C reaches the launcher and both ranks (and the launcher then sends them SIGTERM); both
    stop after the same step, save a ZeRO-3 checkpoint, and a resume gives the weights and rows of
    a run never stopped."""
    from helpers import DEEPSPEED_LAUNCHER

    def launcher(n):
        return [*DEEPSPEED_LAUNCHER, "--num_gpus", "2", "--master_port", str(29300 + os.getpid() % 200 + n)]

    flags = ["--model", str(BASE), "--data", _jsonl(tmp_path / "sft.jsonl", _rows("sft.jsonl", 60)), *LONGER,
             "--max-steps", "14", "--zero-stage", "3"]
    straight = _cli_run(tmp_path, "sft", *flags, "--run-name", "straight", launcher=launcher(0))
    out, _ = straight.communicate(timeout=900)
    assert straight.returncode == 0, out[-3000:]
    out = _signal_after(_cli_run(tmp_path, "sft", *flags, "--run-name", "r", launcher=launcher(1)),
                        tmp_path / "r" / "metrics.jsonl", 6, signal.SIGINT)
    (line,) = [line for line in out.splitlines() if "sft: interrupted; step" in line]
    assert "(under the deepspeed launcher, with 2 ranks again)" in line, out[-3000:]
    step = int(line.split("sft: interrupted; step ")[1].split()[0])
    assert {"trainer/rank0.pt", "trainer/rank1.pt"} <= set(json.loads(
        (tmp_path / "r" / "checkpoints" / f"step{step}" / "manifest.json").read_text())["files"])
    resumed = _cli_run(tmp_path, "sft", "--run-name", "r", "--resume", "true", launcher=launcher(2))
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-3000:]
    assert f"sft: resumed from step {step} of 14" in out
    _assert_same_run(tmp_path / "r", tmp_path / "straight")
