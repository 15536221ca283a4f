"""Conformance with EG v1.9.0's whole translator corpus (`../shared/reference/eg-v1.9.0/gatewayapi-corpus`).

Every case runs (tests/support/translate_corpus.py). For each resource in scope, EG's decision (Accepted and
ResolvedRefs, with reasons) must be ours; every resource out of scope must be refused with a message naming
the field or value. Cases where the translator does not agree yet are listed in `corpus_gaps.txt` with why;
the list is a ratchet: a listed case that starts agreeing fails until it is taken off. The corpus is not part
of the project; without `../shared` these tests skip.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import pytest

from tests.support.translate_corpus import (
    CORPUS,
    UNSUPPORTED,
    Case,
    Outcome,
    api_server_refusals,
    case_names,
    corpus_table,
    load_case,
    our_outcome,
    semantic_checks,
)
from tests.support.translate_crds import crd_refusal
from tests.support.translate_semantics import Check

pytestmark = pytest.mark.skipif(not CORPUS.is_dir(), reason="EG corpus (../shared) not present")

GAPS_FILE = Path(__file__).with_name("corpus_gaps.txt")


def _gaps() -> dict[str, str]:
    gaps = {}
    for line in GAPS_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, why = line.partition(" ")
            gaps[name] = why.strip()
    return gaps


GAPS = _gaps()
CASES = case_names()


DOC = Path(__file__).resolve().parents[2] / "docs" / "translator.md"
TABLE_START, TABLE_END = "<!-- corpus-table:start -->\n", "<!-- corpus-table:end -->"


@functools.cache
def _run(name: str) -> tuple[Case, Outcome, list[Check]]:
    case = load_case(name)
    logging.disable(logging.WARNING)  # the translator's 500-share warnings, one per unresolved backendRef
    try:
        outcome = our_outcome(case)
        return case, outcome, semantic_checks(case, outcome)
    finally:
        logging.disable(logging.NOTSET)


def mismatches(name: str) -> list[str]:
    case, outcome, checks = _run(name)
    found = []
    if outcome.unattributed:
        found.append(f"translator error naming no resource: {outcome.unattributed}")
    for key, eg in sorted(case.eg.items()):
        if key in outcome.refused:
            continue
        ours = outcome.decisions.get(key)
        if ours is None or not eg.same(ours):
            found.append(f"{key}: EG {eg}, ours {ours} {outcome.errors.get(key, '')}")
    found += [f"{check.what}: EG {check.eg}, ours {check.ours}" for check in checks if not check.same]
    return found


@pytest.mark.parametrize("name", CASES)
def test_decisions_and_semantics_are_egs(name: str) -> None:
    found = mismatches(name)
    if name in GAPS:
        assert found, f"{name} now agrees with EG: take it off {GAPS_FILE.name}"
        pytest.xfail(GAPS[name])
    assert not found, "\n".join(found)


_NAMED = re.compile(r"^@\d+: [A-Za-z]+/[^/]+/[^:]+: (spec|metadata|data)[^ ]*: .*unsupported")


def test_out_of_scope_is_refused_by_name() -> None:
    """What the translator does not implement is refused with the field or value named, never ignored."""
    unnamed = []
    for name in CASES:
        _, outcome, _ = _run(name)
        for key, message in outcome.refused.items():
            if UNSUPPORTED in message and not _NAMED.match(message) and "unsupported outside Kubernetes" not in message:
                unnamed.append(f"{name} {key}: {message}")
    assert not unnamed, "\n".join(unnamed[:20])


def test_the_table_in_the_docs_is_this_run() -> None:
    table = corpus_table([_run(name) for name in CASES])
    text = DOC.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    assert text[start:end] == table, f"docs/translator.md's corpus table is stale; this run gives:\n{table}"


def test_gaps_list_only_existing_cases() -> None:
    assert not set(GAPS) - set(CASES)


def test_what_the_api_server_refuses_is_out_of_scope_and_refused_here_too() -> None:
    """Resources a Kubernetes API server would not store (EG's CRD schema, run here on each; or a second
    object of one name) are out of scope, as no cluster hands them to EG; this translator, given the case
    as it is, refuses each of them as well, so counting them out hides no input it would take."""
    refused_by_schema = 0
    taken = []
    for name in CASES:
        case = load_case(name)
        refusals = api_server_refusals(case)
        if not refusals:
            continue
        _, outcome, _ = _run(name)
        docs = dict(case.inputs)
        unfiltered = our_outcome(case, api_server=False)
        for key, why in refusals.items():
            assert outcome.refused.get(key) == why, f"{name} {key}: not counted out of scope"
            if "CRD schema" in why:
                refused_by_schema += 1
                assert crd_refusal(docs[key]) is not None
            # Of several objects of one name, the translator refuses a later one, and with it the input.
            alike = [k for k in refusals if k[:3] == key[:3]] if "CRD schema" not in why else [key]
            if not any(k in unfiltered.errors or k in unfiltered.refused for k in alike):
                taken.append(f"{name} {key}: {why}")
    assert refused_by_schema > 50
    assert not taken, "\n".join(taken)
