"""Routing: the physicists' rules that send a series to models, and the tools around them.

Owns the rules DSL (``rules/*.yaml``), its loader and checks, the engine that evaluates it on a
series header, the ``rules check|explain|test`` tools, the hot-reload watcher, and assembly
(series completion and the routing decision written to the job store).

May import ``dicom_node.jobs``, the public ``dicom_node.modelstore`` API (the model-reference
grammar), ``dicom_node.config``, ``dicom_node.metrics`` and ``dicom_node.audit``; nothing else
of the node (enforced by import-linter, ``[tool.importlinter]`` in ``pyproject.toml``).

Inside, modules import only downwards::

    conditions -> rules -> check -> loader -> engine -> explain, ruletests, watcher -> cli
                                                     -> assembly (uses the job store)

Public API::

    ruleset = load_rules(cfg.rules, destinations=set(cfg.destinations),
                         model_exists=store.model_exists)      # raises RulesError(.problems)
    decision = evaluate(ruleset, header)                       # Dataset or mapping
    decision.matched, decision.discarded, decision.trace, decision.to_dict()

    active = ActiveRules()
    watcher = RulesWatcher(cfg.rules, load, on_change=active.set, on_error=active.set_error)
    watcher.start(); ...; watcher.stop()

The rule language is described in ``rules/README.md``.
"""

from dicom_node.routing.check import shadow_problems
from dicom_node.routing.conditions import (
    AllOf,
    AnyOf,
    Compare,
    Condition,
    ConditionError,
    Exists,
    KeywordPath,
    Not,
    Outcome,
)
from dicom_node.routing.engine import RoutingDecision, TraceEntry, evaluate
from dicom_node.routing.explain import SeriesExplanation, explain_paths
from dicom_node.routing.loader import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    check_rules,
    load_rules,
    parse_text,
    rule_files,
    rules_digest,
)
from dicom_node.routing.rules import (
    Completion,
    Problem,
    Rule,
    RulesError,
    RuleSet,
    parse_model_ref,
)
from dicom_node.routing.ruletests import CaseResult, run_cases
from dicom_node.routing.watcher import ActiveRules, RulesWatcher

__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "ActiveRules",
    "AllOf",
    "AnyOf",
    "CaseResult",
    "Compare",
    "Completion",
    "Condition",
    "ConditionError",
    "Exists",
    "KeywordPath",
    "Not",
    "Outcome",
    "Problem",
    "RoutingDecision",
    "Rule",
    "RuleSet",
    "RulesError",
    "RulesWatcher",
    "SeriesExplanation",
    "TraceEntry",
    "check_rules",
    "evaluate",
    "explain_paths",
    "load_rules",
    "parse_model_ref",
    "parse_text",
    "rule_files",
    "rules_digest",
    "run_cases",
    "shadow_problems",
]
