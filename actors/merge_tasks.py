"""Ray tasks that merge node answers where they lie, so matches never pass through the coordinator.

Every node's answer (a spanner.packed.Packed, as the node actor returned it) is a top-level
ObjectRef argument: Ray resolves it in the task's worker. Large answers are split by identity key
into P partitions (split_task per node), merged independently (one merge task per partition) and
k-way merged into the requested page (one page task).
merge_task and page_task pass whole sorted partitions (for a caller that keeps them); merge_refs
uses merge_head_task and page_heads_task, which pass only what the requested page can draw from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import ray

from spanner.merge import MergedMatch, MergeSpec, merge_top, page, page_heads, split
from spanner.packed import Packed
from spanner.query import Level

NodeMeta = tuple[str, int]  # (node name, priority: lower wins)
PageRef = ray.ObjectRef[tuple[int, list[MergedMatch]]]


def _copies(
    nodes_meta: Sequence[NodeMeta], matches_lists: Sequence[Packed]
) -> list[tuple[str, int, Packed]]:
    if len(nodes_meta) != len(matches_lists):
        raise ValueError(f"{len(nodes_meta)} nodes but {len(matches_lists)} matches lists")
    return [(node, prio, matches) for (node, prio), matches in zip(nodes_meta, matches_lists, strict=True)]


@ray.remote(num_cpus=1)
def merge_task(spec: MergeSpec, nodes_meta: list[NodeMeta], *matches_lists: Packed) -> list[MergedMatch]:
    """Every merged match of one partition, sorted (the page is not applied); the i-th matches list
    belongs to nodes_meta[i]."""
    return merge_top(spec.level, spec.dedup, _copies(nodes_meta, matches_lists))[1]


@ray.remote(num_cpus=1)
def merge_head_task(
    spec: MergeSpec, nodes_meta: list[NodeMeta], *matches_lists: Packed
) -> tuple[int, list[MergedMatch]]:
    """Like merge_task, but returns (size, first offset+limit matches): a page never needs more."""
    return merge_top(spec.level, spec.dedup, _copies(nodes_meta, matches_lists), spec.stop)


@ray.remote(num_cpus=1)
def page_heads_task(spec: MergeSpec, *heads: tuple[int, list[MergedMatch]]) -> tuple[int, list[MergedMatch]]:
    """Total and the requested slice from the heads of the sorted partitions."""
    return page_heads(spec.level, heads, spec.offset, spec.limit)


@ray.remote(num_cpus=1)
def split_task(level: Level, partitions: int, matches: Packed) -> list[Packed]:
    """One node's matches in ``partitions`` packs; call with .options(num_returns=partitions)."""
    if matches.level != level:
        raise ValueError(f"matches are packed for {matches.level}, not {level}")
    return split(matches, partitions)


@ray.remote(num_cpus=1)
def page_task(spec: MergeSpec, *sorted_partitions: list[MergedMatch]) -> tuple[int, list[MergedMatch]]:
    """Total and the requested slice of the merged, sorted partitions."""
    return page(spec.level, sorted_partitions, spec.offset, spec.limit)


def merge_refs(
    spec: MergeSpec,
    nodes_meta: Sequence[NodeMeta],
    matches_refs: Sequence[ray.ObjectRef[Packed]],
    *,
    partitions: int,
) -> PageRef:
    """Build the merge graph and return the ref of (total, page) at once; the caller may await it."""
    if len(nodes_meta) != len(matches_refs):
        raise ValueError(f"{len(nodes_meta)} nodes but {len(matches_refs)} matches refs")
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, not {partitions}")
    meta = [(str(node), int(prio)) for node, prio in nodes_meta]
    # Ray's stubs type neither *args nor num_returns > 1; the graph is checked by tests/test_merge_tasks.py.
    # Merge tasks ship only the head of their partition a page can draw from (merge_head_task): sending
    # whole partitions to the page task cost more in (de)serialisation than the merge itself.
    merge_remote = cast(Any, merge_head_task).remote
    page_remote = cast(Any, page_heads_task).remote
    if partitions == 1:
        merged = merge_remote(spec, meta, *matches_refs)
        return cast(PageRef, page_remote(spec, merged))
    split_remote = cast(Any, split_task).options(num_returns=partitions).remote
    splits: list[list[ray.ObjectRef[Packed]]] = [
        split_remote(spec.level, partitions, ref) for ref in matches_refs
    ]
    heads = [merge_remote(spec, meta, *[node_parts[i] for node_parts in splits]) for i in range(partitions)]
    return cast(PageRef, page_remote(spec, *heads))


def merge_inline(
    spec: MergeSpec, nodes_meta: Sequence[NodeMeta], matches_lists: Sequence[Packed]
) -> tuple[int, list[MergedMatch]]:
    """The same result as merge_refs, in this process: cheaper than tasks for small answers."""
    total, top = merge_top(spec.level, spec.dedup, _copies(nodes_meta, matches_lists), spec.stop)
    return total, top[spec.offset:]
