"""Flags from the environment (launcher/environment.py): the rule, each kind of flag, files,
precedence and mistakes, on a parser of its own; the real programs' are in
test_environment_launch.py and test_environment_processes.py."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from launcher import environment


def size(text: str) -> int:
    if not text.endswith("M"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 10M")
    return int(text[:-1])


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--name", default=None)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--api-key", action="append", default=None)
    parser.add_argument("--port", action="append", type=int, default=None)
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--limit", type=size, default=None)
    parser.add_argument("--token", default=None)
    parser.add_argument("--token-file", default=None)


def parse(environ: dict[str, str], argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prog")
    add_flags(parser)
    return environment.parse_args(parser, argv or [], "broker", environ)


def refused(environ: dict[str, str], capsys: pytest.CaptureFixture[str],
            argv: list[str] | None = None) -> str:
    """The one line a variable that cannot be used ends the program with (EX_CONFIG)."""
    with pytest.raises(SystemExit) as stopped:
        parse(environ, argv)
    assert stopped.value.code == environment.EXIT_CONFIG == 78
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prog: error: "), err
    assert "usage" not in err and "Traceback" not in err
    return err


def test_a_variable_is_the_program_and_the_flags_dest_upper_cased() -> None:
    assert environment.variable("broker", "max_queue") == "DC_BROKER_MAX_QUEUE"
    assert environment.variable("frontend", "db") == "DC_FRONTEND_DB"
    assert environment.prefix("launch") == "DC_LAUNCH_"


def test_a_variable_sets_a_flag_through_its_own_converter() -> None:
    args = parse({"DC_BROKER_MAX_QUEUE": "9", "DC_BROKER_NAME": "a b"})
    assert (args.max_queue, args.name) == (9, "a b")
    assert environment.taken_from(args) == {"max_queue": "DC_BROKER_MAX_QUEUE",
                                            "name": "DC_BROKER_NAME"}


def test_the_flag_wins_over_the_variable_and_the_variable_over_the_default() -> None:
    assert parse({"DC_BROKER_MAX_QUEUE": "9"}, ["--max-queue", "3"]).max_queue == 3
    assert parse({}).max_queue == 256
    assert environment.taken_from(parse({"DC_BROKER_MAX_QUEUE": "9"},
                                        ["--max-queue", "3"])) == {}


def test_an_empty_variable_is_unset() -> None:
    args = parse({"DC_BROKER_MAX_QUEUE": "", "DC_BROKER_INSECURE": "", "DC_BROKER_API_KEY": ""})
    assert (args.max_queue, args.insecure, args.api_key) == (256, False, None)


def test_a_bad_value_is_refused_naming_the_variable_and_the_flag(capsys) -> None:
    err = refused({"DC_BROKER_MAX_QUEUE": "lots"}, capsys)
    assert "DC_BROKER_MAX_QUEUE (--max-queue): 'lots': not a valid int value" in err


def test_a_converters_own_message_is_kept(capsys) -> None:
    assert parse({"DC_BROKER_LIMIT": "10M"}).limit == 10
    err = refused({"DC_BROKER_LIMIT": "ten"}, capsys)
    assert "DC_BROKER_LIMIT (--limit): 'ten': 'ten' is not a size like 10M" in err


def test_a_choice_outside_the_flags_choices_is_refused(capsys) -> None:
    assert parse({"DC_BROKER_LOG_FORMAT": "json"}).log_format == "json"
    assert "not one of text, json" in refused({"DC_BROKER_LOG_FORMAT": "xml"}, capsys)


def test_a_bad_value_the_flag_replaces_is_not_read() -> None:
    assert parse({"DC_BROKER_MAX_QUEUE": "lots"}, ["--max-queue", "3"]).max_queue == 3


@pytest.mark.parametrize("text", (*environment.TRUE, "YES", " On "))
def test_yes(text: str) -> None:
    assert parse({"DC_BROKER_INSECURE": text}).insecure is True


@pytest.mark.parametrize("text", (*environment.FALSE, "False", "OFF"))
def test_no(text: str) -> None:
    assert parse({"DC_BROKER_INSECURE": text}).insecure is False


@pytest.mark.parametrize("text", ["2", "y", "enabled", "-"])
def test_anything_else_is_neither_yes_nor_no(text: str, capsys) -> None:
    err = refused({"DC_BROKER_INSECURE": text}, capsys)
    assert f"DC_BROKER_INSECURE (--insecure): {text!r}: not a yes or no" in err


def test_a_list_is_split_on_commas_and_newlines() -> None:
    args = parse({"DC_BROKER_API_KEY": " k1, k2,,\nk3\n", "DC_BROKER_PORT": "1,2"})
    assert args.api_key == ["k1", "k2", "k3"]
    assert args.port == [1, 2]  # each item through the flag's converter


def test_the_flags_given_replace_the_variables_list() -> None:
    args = parse({"DC_BROKER_API_KEY": "k1,k2"}, ["--api-key", "k3", "--api-key", "k4"])
    assert args.api_key == ["k3", "k4"]


def test_a_bad_item_is_refused(capsys) -> None:
    assert "'x': not a valid int value" in refused({"DC_BROKER_PORT": "1,x"}, capsys)


def test_a_file_gives_the_value_without_its_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "queue").write_text("12\n")
    (tmp_path / "keys").write_text("k1\nk2\r\n\n")
    args = parse({"DC_BROKER_MAX_QUEUE_FILE": str(tmp_path / "queue"),
                  "DC_BROKER_API_KEY_FILE": str(tmp_path / "keys")})
    assert (args.max_queue, args.api_key) == (12, ["k1", "k2"])
    assert environment.taken_from(args)["max_queue"] == "DC_BROKER_MAX_QUEUE"


def test_a_secret_keeps_its_inner_spaces(tmp_path: Path) -> None:
    (tmp_path / "name").write_text("  padded secret \n")
    assert parse({"DC_BROKER_NAME_FILE": str(tmp_path / "name")}).name == "  padded secret "


def test_a_variable_and_its_file_together_are_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "queue").write_text("12")
    err = refused({"DC_BROKER_MAX_QUEUE": "3",
                   "DC_BROKER_MAX_QUEUE_FILE": str(tmp_path / "queue")}, capsys)
    assert "DC_BROKER_MAX_QUEUE and DC_BROKER_MAX_QUEUE_FILE are both set" in err


def test_a_file_that_cannot_be_read_or_is_empty_is_refused(tmp_path: Path, capsys) -> None:
    err = refused({"DC_BROKER_NAME_FILE": str(tmp_path / "missing")}, capsys)
    assert f"DC_BROKER_NAME_FILE (--name): {tmp_path / 'missing'}: cannot read it" in err
    (tmp_path / "empty").write_text("\n")
    err = refused({"DC_BROKER_NAME_FILE": str(tmp_path / "empty")}, capsys)
    assert "the file is empty" in err


def test_a_bad_value_from_a_file_is_not_shown(tmp_path: Path, capsys) -> None:
    (tmp_path / "wrong").write_text("-----BEGIN PRIVATE KEY-----\n")
    err = refused({"DC_BROKER_MAX_QUEUE_FILE": str(tmp_path / "wrong")}, capsys)
    assert "DC_BROKER_MAX_QUEUE_FILE (--max-queue)" in err and "PRIVATE" not in err


def test_a_flags_own_file_variable_is_the_flags(tmp_path: Path) -> None:
    # --token-file's variable is DC_BROKER_TOKEN_FILE: it is that flag's (a path), never
    # --token's value read from a file, or one setting would reach both flags.
    args = parse({"DC_BROKER_TOKEN_FILE": "/run/secrets/token"})
    assert (args.token, args.token_file) == (None, "/run/secrets/token")


def test_an_unknown_variable_is_refused_with_the_nearest_name(capsys) -> None:
    err = refused({"DC_BROKER_MAX_QUEU": "3"}, capsys)
    assert "DC_BROKER_MAX_QUEU is the variable of no flag: did you mean DC_BROKER_MAX_QUEUE?" \
        in err
    err = refused({"DC_BROKER_API_KEYS_FIEL": "/k"}, capsys)
    assert "DC_BROKER_API_KEYS_FIEL" in err


def test_an_unknown_file_variable_is_refused(capsys) -> None:
    assert "DC_BROKER_NOTHING_FILE" in refused({"DC_BROKER_NOTHING_FILE": "/x"}, capsys)


def test_other_programs_variables_are_theirs_to_check() -> None:
    args = parse({"DC_WORKER_MAX_QUEUE": "3", "DC_FRONTEND_WHATEVER": "1", "DC_DATA_DIR": "/d",
                  "DCTEST_FAULT_FAIL_EVERY_JOB": "1"})
    assert args.max_queue == 256


def test_help_names_each_flags_variable_and_never_its_value(capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        parser = argparse.ArgumentParser(prog="prog",
                                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_flags(parser)
        environment.parse_args(parser, ["--help"], "broker",
                               {"DC_BROKER_TOKEN": "s3cret", "DC_BROKER_API_KEY": "k1",
                                "DC_BROKER_NOPE": "typo"})
    assert stopped.value.code == 0  # --help works even with a mistake in the environment
    out = " ".join(capsys.readouterr().out.split())
    for name in ("DC_BROKER_MAX_QUEUE", "DC_BROKER_INSECURE", "DC_BROKER_API_KEY"):
        assert f"[{name}]" in out
    assert "(default: from DC_BROKER_TOKEN)" in out and "(default: from DC_BROKER_API_KEY)" in out
    assert "s3cret" not in out and "k1" not in out
    assert "docs/configuration.md" in out


def test_a_required_flag_can_come_from_its_variable() -> None:
    parser = argparse.ArgumentParser(prog="prog")
    sub = parser.add_subparsers(dest="command")
    join = sub.add_parser("join")
    join.add_argument("--broker", required=True)
    scheme = environment.Scheme({"broker": "DC_WORKER_BROKER"}, ("DC_WORKER_",))
    args = environment.parse(parser, ["join"], scheme, {"DC_WORKER_BROKER": "tcp://h:1"})
    assert args.broker == "tcp://h:1"


def test_a_subcommand_left_out_of_the_scheme_takes_no_variable() -> None:
    parser = argparse.ArgumentParser(prog="prog")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("keys").add_argument("--force", action="store_true")
    scheme = environment.Scheme({"force": "DC_LAUNCH_FORCE"}, ("DC_LAUNCH_",),
                                commands=frozenset())
    args = environment.parse(parser, ["keys"], scheme, {"DC_LAUNCH_FORCE": "yes"})
    assert args.force is False


def test_a_flag_no_variable_can_set_is_refused_when_declared() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--verbose", action="count", default=0)
    with pytest.raises(ValueError, match="--verbose"):
        environment.options(parser)
