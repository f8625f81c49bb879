"""fewshot.config: YAML defaults + argparse flags, errors naming file/key, saving, the CLI error wrapper."""

from __future__ import annotations

import argparse

import pytest
import yaml

from fewshot.config import ConfigError, cli_main, load_config_file, parse_args_with_config, save_config


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prog")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--data-root", default=None)
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off")
    p.add_argument("--milestones", type=int, nargs="+", default=[150, 250])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--backbone", required=True)
    return p


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_precedence_flags_over_file_over_defaults(tmp_path):
    cfg = write(
        tmp_path,
        {"lr": 0.5, "epochs": 3, "data-root": "/d", "milestones": [1, 2], "channels_last": True, "backbone": "conv4"},
    )
    args = parse_args_with_config(make_parser(), ["--config", cfg, "--epochs", "7"])
    assert (args.lr, args.epochs, args.data_root, args.milestones, args.channels_last) == (0.5, 7, "/d", [1, 2], True)
    assert args.backbone == "conv4"  # a required option may come from the file
    assert args.amp == "off" and args.config == cfg
    # Without a file the parser's defaults hold, and it is left unchanged by the earlier call.
    args = parse_args_with_config(make_parser(), ["--backbone", "x"])
    assert (args.lr, args.epochs, args.milestones, args.config) == (0.1, 10, [150, 250], None)


def test_parser_is_not_mutated_by_a_config(tmp_path):
    parser = make_parser()
    parse_args_with_config(parser, ["--config", write(tmp_path, {"lr": 0.5, "backbone": "b"})])
    with pytest.raises(SystemExit):  # backbone is required again: the file's defaults did not stick
        parser.parse_args([])
    assert parser.parse_args(["--backbone", "b"]).lr == 0.1


def test_int_given_for_float_is_converted(tmp_path):
    args = parse_args_with_config(make_parser(), ["--config", write(tmp_path, {"lr": 1, "backbone": "b"})])
    assert args.lr == 1.0 and isinstance(args.lr, float)


def test_unknown_key_names_file_key_and_valid_keys(tmp_path):
    cfg = write(tmp_path, {"lrr": 0.5})
    with pytest.raises(ConfigError) as err:
        parse_args_with_config(make_parser(), ["--config", cfg])
    msg = str(err.value)
    assert cfg in msg and "unknown key 'lrr'" in msg
    assert "valid keys: amp, backbone, channels_last, data_root, epochs, lr, milestones" in msg


@pytest.mark.parametrize(
    "key,value,expect",
    [
        ("epochs", "ten", "key 'epochs' has a bad value 'ten'"),
        ("epochs", 2.5, "key 'epochs' expects an integer, got 2.5"),
        ("lr", True, "key 'lr' expects float, got boolean True"),
        ("channels_last", "yes", "key 'channels_last' expects true or false, got 'yes'"),
        ("amp", "fp8", "key 'amp' has value 'fp8'; choose one of: off, bf16, fp16"),
        ("milestones", 5, "key 'milestones' expects a list, got 5"),
        ("milestones", [1, "x"], "key 'milestones' has a bad value 'x'"),
    ],
)
def test_bad_values_name_the_key(tmp_path, key, value, expect):
    cfg = write(tmp_path, {key: value, "backbone": "b"})
    with pytest.raises(ConfigError) as err:
        parse_args_with_config(make_parser(), ["--config", cfg])
    assert expect in str(err.value) and cfg in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file '.*nope.yaml' does not exist"):
        parse_args_with_config(make_parser(), ["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match="must hold a mapping of option names to values, got list"):
        load_config_file(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="is not valid YAML") as bad:
        load_config_file(write(tmp_path, "a: [1, 2\n"))
    assert "\n" not in str(bad.value)  # one line, with where the problem is
    assert load_config_file(write(tmp_path, "")) == {}


def test_a_key_given_twice_is_refused_not_silently_resolved(tmp_path):
    path = write(tmp_path, "lr: 0.1\nbackbone: conv4\nlr: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config_file(path)
    assert str(err.value) == (
        f"config file {str(path)!r} is not valid YAML: key 'lr' is given twice (lines 1 and 3) (line 3, column 1)"
    )
    assert load_config_file(write(tmp_path, "a:\n  x: 1\nb:\n  x: 2\n")) == {"a": {"x": 1}, "b": {"x": 2}}


def test_save_config_round_trips(tmp_path):
    args = parse_args_with_config(make_parser(), ["--backbone", "b", "--lr", "0.25", "--milestones", "3", "4"])
    path = save_config(args, tmp_path / "run" / "config.yaml")
    saved = yaml.safe_load(path.read_text())
    assert "config" not in saved and saved["lr"] == 0.25 and saved["milestones"] == [3, 4]
    again = parse_args_with_config(make_parser(), ["--config", str(path)])
    assert {k: v for k, v in vars(again).items() if k != "config"} == {
        k: v for k, v in vars(args).items() if k != "config"
    }
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary file left


def test_cli_main_prints_one_line_and_exits_2(capsys):
    @cli_main
    def main(kind):
        if kind == "value":
            raise ValueError("--foo 3 is not valid; use 1 or 2")
        if kind == "file":
            raise FileNotFoundError("dataset folder '/x' does not exist")
        if kind == "os":
            open("/definitely/not/here")
        if kind == "bug":
            raise KeyError("bug")
        return 7

    assert main("ok") == 7
    for kind, text in [
        ("value", "error: --foo 3 is not valid; use 1 or 2\n"),
        ("file", "error: dataset folder '/x' does not exist\n"),
        ("os", "error: No such file or directory: '/definitely/not/here'\n"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(kind)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == text
    with pytest.raises(KeyError):  # bugs keep their traceback
        main("bug")
