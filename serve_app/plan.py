"""A spanning query resolved against its span: which nodes, which deadline, which policies."""

from __future__ import annotations

from dataclasses import dataclass

from spanner.merge import Dedup
from spanner.nodespec import NodeSpec
from spanner.query import NodeQuery
from spanner.schemas import FailureStrategy


@dataclass(frozen=True, slots=True)
class QueryPlan:
    query: NodeQuery
    span: str
    nodes: tuple[NodeSpec, ...]
    timeout_s: float
    failure_strategy: FailureStrategy
    minimum_nodes: int
    dedup: Dedup
    limit: int
    offset: int

    def node_timeout(self, spec: NodeSpec) -> float:
        """A node's own query timeout can only shorten the span's."""
        if spec.query_timeout_s is None:
            return self.timeout_s
        return min(self.timeout_s, spec.query_timeout_s)
