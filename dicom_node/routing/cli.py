"""``dicom-node rules check | explain | test``: the physicists' tools for the routing rules.

Exit codes: ``check`` 0 when the rules load, 1 on any problem; ``test`` 0 when every case passes,
1 otherwise; ``explain`` 0, or 1 when the rules do not load; 2 for a bad configuration or
command line.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.text import Text
from ruamel.yaml import YAML

from dicom_node.config import ConfigError, load_config
from dicom_node.routing.explain import explain_paths, render, render_decision
from dicom_node.routing.loader import check_rules, display_path, load_rules, rule_files
from dicom_node.routing.rules import Problem, RulesError, RuleSet
from dicom_node.routing.ruletests import run_cases

LOGGER = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _config(config_file: Path | None) -> Any:
    try:
        return load_config(config_file)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)


def _rules_dir(option: Path | None, argument: Path | None, config: Any) -> Path:
    if option is not None and argument is not None and option != argument:
        click.echo("error: give the rules folder once (--rules DIR or DIR)", err=True)
        sys.exit(EXIT_USAGE)
    return Path(option or argument or config.rules)


def store_model_exists(models_dir: Path) -> Callable[[str], tuple[bool, str]]:
    """Return ``model_exists(ref) -> (ok, reason)`` for the model store at ``models_dir``.

    Uses :meth:`dicom_node.modelstore.ModelStore.model_exists`; falls back to reading
    ``<name>/aliases.yaml`` and ``<name>/<version>/manifest.yaml`` when the store cannot be
    imported.
    """
    try:
        from dicom_node.modelstore import ModelStore
    except ImportError:  # pragma: no cover - the store ships with the node
        return _files_model_exists(Path(models_dir))
    store = ModelStore(models_dir)
    return store.model_exists


def _files_model_exists(models_dir: Path) -> Callable[[str], tuple[bool, str]]:
    from dicom_node.routing.rules import parse_model_ref

    def exists(ref: str) -> tuple[bool, str]:
        name, alias, version = parse_model_ref(ref)
        folder = models_dir / name
        if not folder.is_dir():
            return False, f"no model '{name}' in the model store {models_dir}"
        if alias is not None:
            try:
                aliases = YAML(typ="safe").load((folder / "aliases.yaml").read_text()) or {}
            except (OSError, ValueError) as exc:
                return False, f"cannot read {folder / 'aliases.yaml'}: {exc}"
            target = aliases.get(alias) if isinstance(aliases, dict) else None
            if target is None:
                return False, f"model '{name}' has no alias '{alias}'"
            version = str(target.get("version") if isinstance(target, dict) else target)
        if not (folder / str(version) / "manifest.yaml").is_file():
            return False, f"model '{name}' has no version '{version}'"
        return True, ""

    return exists


def _print_problems(console: Console, problems: list[Problem]) -> None:
    for problem in problems:
        console.print(Text(str(problem), style="red"))
    console.print(Text(f"{len(problems)} problem(s)", style="bold red"))


def _load_or_exit(console: Console, rules_dir: Path) -> RuleSet:
    """Load for explain/test: matching only (destinations and models are 'check's business)."""
    try:
        return load_rules(rules_dir)
    except RulesError as exc:
        console.print(
            Text(
                f"the rules in {display_path(rules_dir)} do not load "
                f"(run 'dicom-node rules check'):",
                style="bold red",
            )
        )
        _print_problems(console, exc.problems)
        sys.exit(EXIT_FAILED)


_RULES_OPTION = click.option(
    "--rules",
    "rules_option",
    type=click.Path(path_type=Path, file_okay=False),
    help="Rules folder (default: 'rules' of the configuration).",
)
_CONFIG_OPTION = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Node configuration file (destinations, models, rules folder).",
)


@click.group("rules")
def rules() -> None:
    """Check, explain and test the routing rules (rules/*.yaml)."""


@rules.command("check")
@click.argument("rules_dir", required=False, type=click.Path(path_type=Path, file_okay=False))
@_RULES_OPTION
@_CONFIG_OPTION
@click.option("--skip-models", is_flag=True, help="Do not check models against the model store.")
def check_command(
    rules_dir: Path | None, rules_option: Path | None, config_file: Path | None, skip_models: bool
) -> None:
    """Validate every rule file; exit 1 on any problem (each names file, line and rule)."""
    console = _console()
    config = _config(config_file)
    folder = _rules_dir(rules_option, rules_dir, config)
    model_exists = None if skip_models else store_model_exists(config.models)
    problems = check_rules(folder, destinations=set(config.destinations), model_exists=model_exists)
    ignored = sorted(folder.glob("*.yml")) if folder.is_dir() else []
    for path in ignored:
        console.print(
            Text(f"note: {display_path(path)} is not read: rule files end in .yaml", style="yellow")
        )
    if problems:
        _print_problems(console, problems)
        sys.exit(EXIT_FAILED)
    ruleset = load_rules(folder)
    console.print(
        Text(
            f"OK: {len(ruleset.rules)} rule(s) in {len(rule_files(folder))} file(s), "
            f"rule set {ruleset.version}",
            style="green",
        )
    )


@rules.command("explain")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True))
@_RULES_OPTION
@_CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON for tools.")
def explain_command(
    paths: tuple[Path, ...], rules_option: Path | None, config_file: Path | None, as_json: bool
) -> None:
    """For each series in FILE_OR_DIR...: the rule that fires, and why rules above it did not."""
    console = _console()
    config = _config(config_file)
    folder = _rules_dir(rules_option, None, config)
    ruleset = _load_or_exit(console, folder)
    explanations, skipped = explain_paths(ruleset, paths)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "rules_version": ruleset.version,
                    "series": [e.to_dict() for e in explanations],
                    "skipped": [str(p) for p in skipped],
                },
                indent=2,
                default=str,
            )
        )
        return
    render(explanations, ruleset, console)
    if skipped:
        console.print(Text(f"\n{len(skipped)} file(s) skipped: not DICOM", style="yellow"))
    if not explanations:
        console.print(Text("no DICOM series found", style="yellow"))


@rules.command("test")
@click.argument("rules_dir", required=False, type=click.Path(path_type=Path, file_okay=False))
@_RULES_OPTION
@_CONFIG_OPTION
def test_command(
    rules_dir: Path | None, rules_option: Path | None, config_file: Path | None
) -> None:
    """Run the cases in <rules dir>/tests/*.yaml; exit 1 if any case fails."""
    console = _console()
    config = _config(config_file)
    folder = _rules_dir(rules_option, rules_dir, config)
    ruleset = _load_or_exit(console, folder)
    results, problems = run_cases(ruleset, folder)
    for result in results:
        where = f"{result.file}:{result.line}" if result.line else result.file
        if result.passed:
            console.print(Text("PASS ", style="bold green") + Text(f"{result.name}  ({where})"))
            continue
        console.print(Text("FAIL ", style="bold red") + Text(f"{result.name}  ({where})"))
        if result.error:
            console.print(Text(f"     {result.error}"))
        else:
            console.print(
                Text(
                    f"     expected: {', '.join(result.expected) or 'none'}; "
                    f"got: {', '.join(result.got) or 'none'}"
                )
            )
            if result.decision is not None:
                render_decision(result.decision, console, indent="     ")
    if problems:
        _print_problems(console, problems)
    failed = sum(not r.passed for r in results)
    if not results and not problems:
        console.print(Text(f"no test cases in {display_path(folder / 'tests')}", style="yellow"))
        return
    style = "bold red" if failed or problems else "bold green"
    console.print(Text(f"{len(results) - failed} passed, {failed} failed", style=style))
    if failed or problems:
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":  # pragma: no cover - `python -m dicom_node.routing.cli`
    rules()
