"""The generated reference pages in docs/ equal the code they are generated from, their help text
covers exactly the keys and options the code has, and the README's links resolve."""

import argparse
import importlib
import inspect
import re
from pathlib import Path

import pytest

from unlearn_search import docs

REPO = Path(__file__).resolve().parents[1]
FAST_PAGES = ("space.md", "cli.md", "outputs.md")  # methods.md and memory_plan.md have their own tests


@pytest.mark.parametrize("name", FAST_PAGES)
def test_generated_page_is_the_code(name):
    text = (REPO / "docs" / name).read_text()
    assert text == docs.pages()[name](), f"docs/{name} is stale: run {docs.REGENERATE}"


def test_help_covers_exactly_the_keys_and_options():
    assert docs.help_gaps() == [], "\n".join(docs.help_gaps())


def test_help_gaps_finds_a_missing_and_a_stale_entry(monkeypatch):
    monkeypatch.delitem(docs.TOP_HELP, "description")
    monkeypatch.setitem(docs.OBJECTIVE_HELP, "not_a_key", "help for nothing")
    bare = argparse.ArgumentParser(prog="unlearn-search bare")
    bare.add_argument("--no-help")
    monkeypatch.setattr(docs, "commands", lambda real=docs.commands: [*real(), (("bare",), "a command", bare)])
    gaps = docs.help_gaps()
    assert "space.description: no help in unlearn_search/docs.py" in gaps
    assert "objective.not_a_key: help for a key the code does not have" in gaps
    assert "unlearn-search bare --no-help: no help in cli.py" in gaps


def test_space_page_names_every_key():
    from unlearn_search.search.space import PARAM_KEYS, TOP_KEYS

    text = docs.space_markdown()
    for key in TOP_KEYS | PARAM_KEYS:
        assert f"| `{key}` |" in text, key


def test_cli_page_lists_every_command_and_option():
    text = docs.cli_markdown()
    for words, _, sub in docs.commands():
        assert f"## unlearn-search {' '.join(words)}\n" in text
        for action in docs._options(sub):
            assert f"| `{action.option_strings[0]}`" in text
    assert "`unlearn-search docs`" in text


def test_argparse_private_parts_the_cli_page_reads():
    """docs._subcommands walks ``parser._actions``, ``argparse._SubParsersAction`` and its
    ``_choices_actions``: argparse has no public API that lists subcommands and options. This
    fails loudly, naming the attribute, when an argparse release changes them."""
    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--flag", action="store_true", help="a flag")
    commands = parser.add_subparsers(dest="command")
    sub = commands.add_parser("sub", help="a subcommand")
    sub.add_argument("--n", type=int, default=3, help="n (default %(default)s)")
    assert hasattr(argparse, "_SubParsersAction"), "argparse._SubParsersAction is gone"
    assert isinstance(getattr(parser, "_actions", None), list), "ArgumentParser._actions is gone"
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(found) == 1 and found[0].choices == {"sub": sub}, "subparsers no longer keep choices"
    pseudo = getattr(found[0], "_choices_actions", None)
    assert pseudo is not None, "_SubParsersAction._choices_actions is gone"
    assert [(a.dest, a.help) for a in pseudo] == [("sub", "a subcommand")], "_choices_actions changed shape"
    option = next(a for a in sub._actions if a.option_strings == ["--n"])
    assert (option.default, option.type, option.nargs, option.required) == (3, int, None, False)
    assert docs._option_help(option, sub.prog) == "n (default 3)"
    flag = next(a for a in parser._actions if a.option_strings == ["--flag"])
    assert flag.nargs == 0 and flag.default is False
    assert [words for words, _, _ in docs._subcommands(parser)] == [("sub",)]


def _module_source(module: str) -> str:
    return inspect.getsource(importlib.import_module(module))


def test_output_names_written_as_literals_are_in_the_code_that_writes_them():
    for path, _, written in docs.output_entries():
        if written is not None:
            module, literal = written
            source = _module_source(module)
            assert f'"{literal}"' in source or f"'{literal}'" in source, (
                f"docs/outputs.md: {path}: {literal!r} is no longer in {module}; fix "
                f"unlearn_search/docs.py output_entries and run {docs.REGENERATE}"
            )


def test_evaluation_files_are_the_ones_tracked_and_written():
    from unlearn_search.evaluation.evaluate import OFFICIAL_RESULTS_FILE
    from unlearn_search.tracking.mlflow_tracking import TRIAL_ARTIFACTS

    files = {path for path, _ in docs.evaluation_files() if not path.endswith("/")}
    assert files - {OFFICIAL_RESULTS_FILE} <= set(TRIAL_ARTIFACTS)
    assert set(TRIAL_ARTIFACTS) - files == {"metrics.jsonl"}  # a trial's, not an evaluation's
    assert any(path.endswith("/metrics.jsonl") for path, _, _ in docs.output_entries())


def test_the_tree_refuses_a_path_whose_folder_is_not_listed():
    with pytest.raises(ValueError, match="a/b: its folder a/ is not listed"):
        docs._tree([("a/b", "x")])
    assert docs._tree([("a/", "x"), ("a/b", "y"), ("c", "z")]) == [
        "outputs/<space name>/",
        "├── a/     # x",
        "│   └── b  # y",
        "└── c      # z",
    ]


def test_docs_command_checks_and_writes(tmp_path, monkeypatch, capsys):
    from unlearn_search.cli import main

    monkeypatch.setattr(docs, "pages", lambda: {"a.md": lambda: "A\n", "b.md": lambda: "B\n"})
    assert main(["docs", "--dir", str(tmp_path)]) == 2
    assert "a.md, b.md differ from the code" in capsys.readouterr().err
    assert main(["docs", "--write", "--dir", str(tmp_path)]) == 0
    assert (tmp_path / "a.md").read_text() == "A\n" and (tmp_path / "b.md").read_text() == "B\n"
    assert main(["docs", "--dir", str(tmp_path)]) == 0
    assert "every generated page is up to date" in capsys.readouterr().out


def test_readme_links_resolve_and_name_every_reference_page():
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    missing = [link for link in links if "://" not in link and not (REPO / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
    for page in (
        "space.md",
        "cli.md",
        "outputs.md",
        "evaluation.md",
        "methods.md",
        "adding_a_method.md",
        "gpu_path.md",
        "memory_plan.md",
        "results.md",
    ):
        assert f"docs/{page}" in links, page
    assert len(readme.splitlines()) <= 160
