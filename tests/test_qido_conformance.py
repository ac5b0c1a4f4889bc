"""QIDO-RS through the spanner against a reference: Orthanc with Debian's DICOMweb plugin holds every
instance whole; the spanner holds the same instances spread over two Orthanc archives (one study split
across them, one mirrored on both). For each search of the table the two answers are equal attribute by
attribute, after only the normalisations the standard allows, each listed in ``normalised``:

1. Order: PS3.18 §10.6 defines no order of matches; both sides are sorted by the level's UID.
2. RetrieveURL (0008,1190) is each server's own URL: compared from ``/studies/...`` on.
3. An attribute without a value and an absent one say the same (no value known): both are dropped. The
   reference leaves out what its index does not hold; C-FIND returns every key asked, empty if unknown.
4. ModalitiesInStudy (0008,0061) is a set (PS3.4 C.6.2.1.2 gives its values no order): values sorted.
5. Modality (0008,0060) at study level is a series attribute; which series' value a server shows is not
   defined, so it is dropped from study-level answers.

Orthanc-DICOMweb 1.7 reads UID lists separated by commas only; lists separated by backslashes (also
PS3.18 §8.3.4.1) are checked in tests/test_qido.py against the same list with commas.

Paging is compared as the standard defines it: with no order defined, pages of the same size whose union
is the whole answer, without repeats.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Api
from tests.peers.dicomweb_data import MIRRORED_STUDY, SPAN, SPLIT_STUDY, STUDIES, Universe, universe_of

JSON = {"Accept": "application/dicom+json"}
UIDS = {"studies": "0020000D", "series": "0020000E", "instances": "00080018"}
RETRIEVE_URL = "00081190"
OTHER = STUDIES[2].uid

SEARCHES = [
    "/studies",
    "/studies?includefield=00081030,00080060,00080090,00100030",
    "/studies?includefield=StudyDescription&includefield=PatientBirthDate",
    "/studies?PatientID=PAT-1",
    "/studies?00100020=PAT-2",
    "/studies?PatientName=Doe*",
    "/studies?PatientName=*ller*",
    "/studies?PatientName=D?e^Jane",
    "/studies?StudyDate=20240101-20241231",
    "/studies?StudyDate=-20231231",
    "/studies?StudyDate=20240105",
    f"/studies?StudyInstanceUID={SPLIT_STUDY},{OTHER}",
    "/studies?ModalitiesInStudy=MR",
    "/studies?AccessionNumber=ACC-3",
    "/studies?StudyDescription=*e*&includefield=00081030",
    "/series",
    "/series?Modality=CT",
    f"/studies/{SPLIT_STUDY}/series",
    f"/studies/{SPLIT_STUDY}/series?includefield=0008103E,00080021",
    f"/studies/{MIRRORED_STUDY}/series",
    "/series?SeriesDescription=Head*",
    "/instances",
    f"/studies/{SPLIT_STUDY}/instances",
    f"/studies/{SPLIT_STUDY}/series/{SPLIT_STUDY}.2/instances",
    f"/instances?SOPInstanceUID={OTHER}.1.2",
    f"/studies/{OTHER}/instances?InstanceNumber=1",
]


@pytest.fixture(scope="module")
def universe(api: Api) -> Iterator[Universe]:
    yield from universe_of(api)


def normalised(answer: list[dict[str, Any]], resource: str) -> list[dict[str, Any]]:
    """The normalisations of the module docstring, numbered alike."""
    out = []
    for dataset in answer:
        shown: dict[str, Any] = {}
        for tag, attribute in dataset.items():
            if not attribute.get("Value"):  # 3
                continue
            if tag == RETRIEVE_URL:  # 2
                url = attribute["Value"][0]
                attribute = {"vr": "UR", "Value": [url[url.index("/studies/"):]]}
            if tag == "00080061":  # 4
                attribute = {**attribute, "Value": sorted(attribute["Value"])}
            if tag == "00080060" and resource == "studies":  # 5
                continue
            shown[tag] = attribute
        out.append(shown)
    return sorted(out, key=lambda ds: str(ds.get(UIDS[resource], {}).get("Value")))  # 1


def resource_of(search: str) -> str:
    return search.split("?")[0].rstrip("/").rsplit("/", 1)[-1]


def both(api: Api, universe: Universe, search: str) -> tuple[httpx.Response, httpx.Response]:
    spanner = api.http.get(f"/dicomweb/spans/{SPAN}{search}", headers={**JSON, "Cache-Control": "no-cache"})
    reference = httpx.get(universe.reference.dicomweb_url + search, headers=JSON, timeout=30)
    return spanner, reference


@pytest.mark.parametrize("search", SEARCHES)
def test_answer_equals_the_reference(api: Api, universe: Universe, search: str) -> None:
    spanner, reference = both(api, universe, search)
    assert reference.status_code == 200, reference.text
    assert spanner.status_code == 200, spanner.text
    assert spanner.headers["content-type"].startswith("application/dicom+json")
    assert "warning" not in spanner.headers, spanner.headers["warning"]
    resource = resource_of(search)
    expected = normalised(reference.json(), resource)
    got = normalised(spanner.json(), resource)
    assert expected, f"the reference found nothing for {search}: the table would prove nothing"
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        assert mine == theirs


@pytest.mark.parametrize("search", ["/studies", "/series", "/instances"])
def test_pages_cover_the_reference_answer(api: Api, universe: Universe, search: str) -> None:
    whole = normalised(both(api, universe, search)[1].json(), resource_of(search))
    size = 2
    pages: list[dict[str, Any]] = []
    for offset in range(0, len(whole) + size, size):
        spanner, reference = both(api, universe, f"{search}?limit={size}&offset={offset}")
        assert spanner.status_code == reference.status_code == 200
        assert len(spanner.json()) == len(reference.json()), offset
        pages += spanner.json()
    assert normalised(pages, resource_of(search)) == whole
