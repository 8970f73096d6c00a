"""Job states and the one table of allowed transitions between them.

Every statement that changes a job's state is built by
:func:`dicom_node.jobs.transitions.move`, which checks its edges against :data:`TRANSITIONS` and
puts the allowed source states in its ``WHERE`` clause, so a transition is checked and applied in
one atomic statement.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType


class JobState(StrEnum):
    """States of a job; the order of the members is the order of the pipeline."""

    RECEIVED = "received"
    ROUTED = "routed"
    QUEUED = "queued"
    RUNNING = "running"
    EXPORTING = "exporting"
    HELD = "held"
    """Results built but kept back (the rule's ``on_low_confidence: hold``) until a person
    runs ``dicom-node release`` (export them) or ``dicom-node discard``."""
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


TERMINAL: frozenset[JobState] = frozenset({JobState.DONE, JobState.FAILED, JobState.SKIPPED})
"""States with no work pending. ``done`` and ``failed`` may still be re-opened (a late instance)
or retried (``dicom-node retry``): see :data:`TRANSITIONS`."""

TRANSITIONS: Mapping[JobState, frozenset[JobState]] = MappingProxyType(
    {
        # assembly: the first instance's header decides
        JobState.RECEIVED: frozenset({JobState.ROUTED, JobState.SKIPPED}),
        # assembly: the rule's completion holds
        JobState.ROUTED: frozenset({JobState.QUEUED}),
        # a worker claims it; a late instance sends it back to wait for completion again
        JobState.QUEUED: frozenset({JobState.RUNNING, JobState.ROUTED}),
        # the SEG is on disk; it failed; a stopping node gives it back unstarted; the series
        # holds no image (an SR, an RT plan routed to a model): nothing to segment, or a
        # low-confidence result the rule discards; a low-confidence result the rule holds
        JobState.RUNNING: frozenset(
            {
                JobState.EXPORTING,
                JobState.FAILED,
                JobState.QUEUED,
                JobState.SKIPPED,
                JobState.HELD,
            }
        ),
        # a person decides: ``release`` exports the results, ``discard`` drops them; a late
        # instance rebuilds the result (and judges its confidence again)
        JobState.HELD: frozenset({JobState.EXPORTING, JobState.SKIPPED, JobState.ROUTED}),
        # delivered everywhere, or given up
        JobState.EXPORTING: frozenset({JobState.DONE, JobState.FAILED}),
        # a late instance: rebuild the result (same SEG UIDs, so the PACS replaces it);
        # ``dicom-node rerun``: process the stored instances again, with the current or a named
        # version (same version: same SEG UIDs; another version: a new SEG beside the old)
        JobState.DONE: frozenset({JobState.ROUTED, JobState.QUEUED}),
        # a late instance, or ``retry``: re-export the SEG if it exists, else run again; or
        # ``rerun`` (run again)
        JobState.FAILED: frozenset({JobState.ROUTED, JobState.QUEUED, JobState.EXPORTING}),
        # nothing to do for this series, ever
        JobState.SKIPPED: frozenset(),
    }
)
"""Allowed edges: ``TRANSITIONS[source]`` is the set of states a job in ``source`` may move to.

Staying in a state (a claim that renews an export's lease) is not a transition."""


class TransitionError(ValueError):
    """A job cannot move between these states: the edge is not in :data:`TRANSITIONS`, or the
    job is no longer in a state the move starts from (another process moved it first)."""


def check(source: JobState, target: JobState) -> None:
    """Raise unless ``source -> target`` is an edge of :data:`TRANSITIONS`.

    Raises
    ------
    TypeError
        ``source`` or ``target`` is not a :class:`JobState`.
    TransitionError
        The edge is not in the table.
    """
    for name, value in (("source", source), ("target", target)):
        if not isinstance(value, JobState):
            raise TypeError(f"`{name}` must be a JobState, not {value!r}")
    if target not in TRANSITIONS[source]:
        raise TransitionError(
            f"no transition {source.value!r} -> {target.value!r}; from {source.value!r} a job may "
            f"go to: {_names(TRANSITIONS[source]) or 'nothing (it is final)'}"
        )


def sources_of(target: JobState) -> frozenset[JobState]:
    """The states a job may move to ``target`` from."""
    return frozenset(s for s, targets in TRANSITIONS.items() if target in targets)


def _names(states: frozenset[JobState]) -> str:
    return ", ".join(s.value for s in JobState if s in states)
