"""Routing rules: physicists' YAML files that send series to models, and the tools around them.

Public API::

    ruleset = load_rules(cfg.rules, destinations=set(cfg.destinations),
                         model_exists=store.model_exists)      # raises RulesError(.problems)
    decision = ruleset.evaluate(header)                        # Dataset or mapping
    decision.matched, decision.discarded, decision.trace, decision.to_dict()

    active = ActiveRules()
    watcher = RulesWatcher(cfg.rules, load, on_change=active.set, on_error=active.set_error)
    watcher.start(); ...; watcher.stop()

The rule language is described in ``rules/README.md``.
"""

from dicom_node.routing.check import check_rules, shadow_problems
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
