"""PS3.4 C.2.2.2 attribute matching, one rule at a time (pure functions, no network)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulator import matching
from simulator.matching import compile_matcher, is_universal, matches

_LETTERS = st.characters(categories=["L", "N"])


class TestUniversal:
    @pytest.mark.parametrize("value", ["", "  ", "*", "**"])
    def test_empty_or_only_stars_is_universal(self, value: str) -> None:
        assert is_universal(value)
        assert compile_matcher("LO", value) is None

    def test_universal_matches_a_record_without_a_value(self) -> None:
        assert matches("LO", "", ())
        assert matches("PN", "*", ())

    def test_a_list_holding_a_universal_item_is_universal(self) -> None:
        assert compile_matcher("CS", "CT\\*") is None


class TestSingleValue:
    def test_exact_and_case_sensitive_for_text(self) -> None:
        assert matches("LO", "CT HEAD", ("CT HEAD",))
        assert not matches("LO", "CT HEAD", ("ct head",))
        assert not matches("CS", "CT", ("CTX",))

    def test_padding_is_insignificant(self) -> None:
        assert matches("SH", "ACC1 ", ("ACC1",))
        assert matches("CS", "CT", ("CT ",))

    def test_person_name_is_case_insensitive_including_non_ascii(self) -> None:
        assert matches("PN", "MÜLLER^JÖRG", ("Müller^Jörg",))
        assert matches("PN", "øster^åse", ("Øster^Åse",))
        assert not matches("PN", "Müller", ("Müller^Jörg",))

    def test_person_name_ignores_empty_trailing_components(self) -> None:
        assert matches("PN", "Doe^John", ("Doe^John^^^",))
        assert matches("PN", "DOE^JOHN^^", ("Doe^John",))

    def test_person_name_key_matches_the_alphabetic_group(self) -> None:
        assert matches("PN", "Yamada^Tarou", ("Yamada^Tarou=山田^太郎=やまだ^たろう",))

    def test_numbers_compare_by_value(self) -> None:
        assert matches("IS", "05", ("5",))
        assert not matches("IS", "6", ("5",))
        assert not matches("IS", "5", ("",))

    def test_a_record_without_a_value_does_not_match(self) -> None:
        assert not matches("LO", "X", ())
        assert not matches("DA", "20200101", ("",))


class TestWildcard:
    @pytest.mark.parametrize(
        ("pattern", "value", "expected"),
        [
            ("CT*", "CT HEAD", True),
            ("*HEAD", "CT HEAD", True),
            ("*", "", True),
            ("C?", "CT", True),
            ("C?", "CTX", False),
            ("?T*D", "CT HEAD", True),
            ("*CHEST*", "CT HEAD", False),
            ("ct*", "CT HEAD", False),  # case-sensitive outside PN
        ],
    )
    def test_star_and_question_mark(self, pattern: str, value: str, expected: bool) -> None:
        assert matches("LO", pattern, (value,)) is expected

    def test_person_name_wildcards_ignore_case_and_count_characters_not_bytes(self) -> None:
        assert matches("PN", "mü*", ("Müller^Jörg",))
        assert matches("PN", "*^J?RG", ("Müller^Jörg",))
        assert matches("PN", "?ster*", ("Øster^Åse",))

    def test_regex_characters_are_literal(self) -> None:
        assert matches("LO", "A.B*", ("A.B C",))
        assert not matches("LO", "A.B*", ("AXB C",))
        assert matches("PN", "O'Brien*", ("O'Brien^Mark",))
        assert matches("LO", "(1)*", ("(1) [x]",))

    def test_no_wildcards_on_uids_and_dates(self) -> None:
        assert not matches("UI", "1.2.*", ("1.2.3",))
        assert not matches("DA", "2020*", ("20200101",))

    @given(prefix=st.text(_LETTERS, max_size=8), middle=st.text(_LETTERS, min_size=1, max_size=8),
           suffix=st.text(_LETTERS, max_size=8), other=st.text(_LETTERS, max_size=12))
    def test_star_around_a_literal_finds_it_anywhere(self, prefix: str, middle: str, suffix: str,
                                                     other: str) -> None:
        assert matches("LO", f"*{middle}*", (f"{prefix}{middle}{suffix}",))
        assert matches("LO", f"*{middle}*", (other,)) is (middle in other)

    def test_regex_is_compiled_once_per_query_not_per_record(self, monkeypatch: pytest.MonkeyPatch) -> None:
        calls: list[str] = []
        original = matching.wildcard_regex

        def counting(pattern: str, ignore_case: bool = False) -> re.Pattern[str]:
            calls.append(pattern)
            return original(pattern, ignore_case)

        monkeypatch.setattr(matching, "wildcard_regex", counting)
        matcher = compile_matcher("PN", "Mü*")
        assert matcher is not None
        hits = sum(matcher((name,)) for name in ["Müller^Jörg", "Smith^Anna", "MÜLLER^X"] * 1000)
        assert hits == 2000
        assert len(calls) == 1


class TestRange:
    @pytest.mark.parametrize(
        ("key", "value", "expected"),
        [
            ("20200101-20201231", "20200101", True),
            ("20200101-20201231", "20201231", True),
            ("20200101-20201231", "20210101", False),
            ("20200101-", "20991231", True),
            ("20200101-", "20191231", False),
            ("-20200101", "19000101", True),
            ("-20200101", "20200102", False),
            ("20200101", "20200101", True),
            ("20200101", "20200102", False),
        ],
    )
    def test_dates(self, key: str, value: str, expected: bool) -> None:
        assert matches("DA", key, (value,)) is expected

    def test_old_dotted_dates_compare_too(self) -> None:
        assert matches("DA", "2020.01.01-2020.01.31", ("20200115",))

    @pytest.mark.parametrize(
        ("key", "value", "expected"),
        [
            ("0800-1200", "0800", True),
            ("0800-1200", "115959.5", True),
            ("0800-1200", "1200", True),
            ("0800-1200", "120059", True),  # "1200" as an end means the whole minute
            ("0800-1200", "120100", False),
            ("0800-1200", "075959", False),
            ("-09", "095959", True),
            ("10-", "095959", False),
            ("10", "1030", True),  # a single partial time is the range it covers
            ("10:30-11:00", "104500", True),
        ],
    )
    def test_times_honour_precision(self, key: str, value: str, expected: bool) -> None:
        assert matches("TM", key, (value,)) is expected

    def test_date_times(self) -> None:
        assert matches("DT", "2020-2021", ("20211231235959",))
        assert not matches("DT", "2020-2021", ("20220101",))
        assert matches("DT", "20200101120000-", ("20200101120000.5+0100",))
        assert matches("DT", "-202001", ("20200131",))


class TestLists:
    def test_list_of_uids(self) -> None:
        key = "1.2.3\\1.2.4"
        assert matches("UI", key, ("1.2.4",))
        assert not matches("UI", key, ("1.2.5",))
        assert not matches("UI", key, ("1.2.3.4",))

    def test_list_of_codes_is_any_of(self) -> None:
        assert matches("CS", "MR\\CT", ("CT",))
        assert not matches("CS", "MR\\CT", ("US",))


class TestMultiValuedRecords:
    def test_any_record_value_may_match(self) -> None:
        assert matches("CS", "SR", ("CT", "SR"))
        assert not matches("CS", "MR", ("CT", "SR"))
        assert matches("CS", "MR\\SR", ("CT", "SR"))
        assert matches("CS", "S*", ("CT", "SR"))

    def test_uid_list_against_multi_valued_record(self) -> None:
        assert matches("UI", "9.9\\1.2.840.10008.5.1.4.1.1.2", ("1.2.840.10008.5.1.4.1.1.88.67",
                                                               "1.2.840.10008.5.1.4.1.1.2"))
