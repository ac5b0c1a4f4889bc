"""A spanning query over three real Orthanc archives: the merged answer is what was stored, at every level."""

from __future__ import annotations

import shutil
from collections import defaultdict
from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset

from simulator.dataset import generate_fleet
from tests.conftest import Api, require
from tests.peers.orthanc import OrthancPeer, orthanc_executable, stop_all

NODES = ("orthanc-a", "orthanc-b", "orthanc-c")
KEYS = {
    "PATIENT": ("PatientID",),
    "STUDY": ("StudyInstanceUID",),
    "SERIES": ("SeriesInstanceUID",),
    "IMAGE": ("SOPInstanceUID",),
}
TAGS = {
    "PatientID": "00100020",
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "SOPInstanceUID": "00080018",
}


@pytest.fixture(scope="module")
def archives(api: Api) -> Iterator[dict[str, list[Dataset]]]:
    require(orthanc_executable() is not None and shutil.which("findscu") is not None, "Debian's orthanc")
    stored = dict(zip(NODES, generate_fleet(seed=7, nodes=3, patients=12), strict=True))
    peers = [OrthancPeer(aet=f"ORTHANC{i}", default_encoding="Utf8") for i in range(3)]
    try:
        for peer, name in zip(peers, NODES, strict=True):
            peer.start()
            peer.upload_datasets(stored[name])
            api.add_node(name, peer.dicom_port, ae_title=peer.aet, priority=10 * (NODES.index(name) + 1))
        api.add_span("orthanc", list(NODES), ae_title="ORTHANCS")
        yield stored
    finally:
        for name in NODES:
            api.http.delete(f"/api/v1/nodes/{name}")
        stop_all(peers, graceful=False)


def holders(stored: dict[str, list[Dataset]], level: str) -> dict[str, set[str]]:
    keyword = KEYS[level][0]
    found: dict[str, set[str]] = defaultdict(set)
    for node, instances in stored.items():
        for ds in instances:
            found[str(ds.data_element(keyword).value)].add(node)
    return found


def value(match: dict[str, object], keyword: str) -> object:
    element = match["dataset"].get(TAGS.get(keyword, keyword))  # type: ignore[union-attr]
    return element["Value"][0] if element and element.get("Value") else None  # type: ignore[index]


@pytest.mark.parametrize("level", ["PATIENT", "STUDY", "SERIES", "IMAGE"])
def test_merged_answer_is_the_union_of_what_was_stored(
    api: Api, archives: dict[str, list[Dataset]], level: str
) -> None:
    status, answer = api.query(level=level, span="orthanc", limit=1000)
    assert status == 200, answer
    assert answer["status"] == "success"
    assert [o["status"] for o in answer["nodes"]] == ["ok", "ok", "ok"]  # type: ignore[index]
    expected = holders(archives, level)
    got = {str(value(m, KEYS[level][0])): sorted(m["nodes"]) for m in answer["matches"]}  # type: ignore[union-attr]
    assert answer["total"] == len(expected) == len(got)
    assert got == {key: sorted(nodes) for key, nodes in expected.items()}


def test_split_study_counts_take_the_largest_copy_and_modalities_union(
    api: Api, archives: dict[str, list[Dataset]]
) -> None:
    status, answer = api.query(
        level="STUDY", span="orthanc", return_keys=["NumberOfStudyRelatedInstances", "ModalitiesInStudy"]
    )
    assert status == 200
    per_node: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    modalities: dict[str, set[str]] = defaultdict(set)
    for node, instances in archives.items():
        for ds in instances:
            per_node[ds.StudyInstanceUID][node] += 1
            modalities[ds.StudyInstanceUID].add(ds.Modality)
    for match in answer["matches"]:  # type: ignore[union-attr]
        uid = str(value(match, "StudyInstanceUID"))
        count = match["dataset"]["00201208"]["Value"][0]
        assert int(count) == max(per_node[uid].values()), uid
        assert set(match["dataset"]["00080061"]["Value"]) == modalities[uid]


def test_mirrored_study_is_filled_from_every_copy(api: Api, archives: dict[str, list[Dataset]]) -> None:
    """Patient 0's first study is on every node; only the first copy has StudyDescription."""
    status, answer = api.query(
        level="STUDY", span="orthanc", filters={"PatientName": "Müller*"}, dedup="merge_all"
    )
    assert status == 200
    first = [m for m in answer["matches"] if len(m["nodes"]) == 3]  # type: ignore[union-attr]
    assert first, "the mirrored study should be held by all three archives"
    described = first[0]["dataset"].get("00081030", {}).get("Value")
    assert described, "merge_all should fill StudyDescription from the copy that has it"
    name = first[0]["dataset"]["00100010"]["Value"][0]["Alphabetic"]
    assert name == "Müller^Jörg"


def test_filters_reach_every_archive(api: Api, archives: dict[str, list[Dataset]]) -> None:
    uid = str(archives["orthanc-b"][0].StudyInstanceUID)
    status, answer = api.query(level="SERIES", span="orthanc", filters={"StudyInstanceUID": uid})
    assert status == 200
    expected = {
        str(ds.SeriesInstanceUID)
        for instances in archives.values()
        for ds in instances
        if ds.StudyInstanceUID == uid
    }
    assert {str(value(m, "SeriesInstanceUID")) for m in answer["matches"]} == expected  # type: ignore[union-attr]
