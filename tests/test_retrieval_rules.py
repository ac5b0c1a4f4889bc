"""How part outcomes add up to the final C-MOVE status (PS3.4 C.4.2.1.5), without archives."""

from __future__ import annotations

from serve_app.retrieval import DESTINATION_UNKNOWN, SUCCESS, UNABLE, WARNING_FAILURES, Part, _result
from spanner.nodespec import NodeSpec
from spanner.query import Level

NODE = NodeSpec(name="n", ae_title="N", host="127.0.0.1", port=104, calling_ae_title="S")


def part(
    done: bool, completed: int = 0, failed: int = 0, tried: list[dict[str, object]] | None = None
) -> Part:
    p = Part(Level.SERIES, {"SeriesInstanceUID": "1.2"}, [NODE])
    p.done, p.tried = done, tried or []
    p.counts.update(completed=completed, failed=failed)
    return p


def test_all_done_without_failures_is_success() -> None:
    assert _result([part(True, 3), part(True, 2)]).dimse_status == SUCCESS


def test_failed_suboperations_or_a_failed_part_with_some_moved_is_b000() -> None:
    assert _result([part(True, 3, failed=1)]).dimse_status == WARNING_FAILURES
    result = _result([part(True, 3), part(False, tried=[{"status": "refused", "error": "down"}])])
    assert (result.status, result.dimse_status) == ("warning", WARNING_FAILURES)
    assert "down" in str(result.error)


def test_every_holder_not_knowing_the_destination_is_a801() -> None:
    tried = [{"status": "failed", "dimse_status": DESTINATION_UNKNOWN}]
    assert _result([part(False, tried=tried), part(False, tried=tried)]).dimse_status == DESTINATION_UNKNOWN


def test_nothing_moved_for_other_reasons_is_c000() -> None:
    result = _result([part(False, tried=[{"status": "aborted", "dimse_status": None}])])
    assert (result.status, result.dimse_status) == ("failed", UNABLE)
    assert _result([]).error == "no node of the span holds the requested objects"
