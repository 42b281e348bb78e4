from __future__ import annotations

import pytest

from bimcv_fetch.catalog import load_catalog
from bimcv_fetch.errors import ConfigError


def test_catalog_has_the_four_releases() -> None:
    cat = load_catalog()
    assert set(cat.releases) == {"posi-1", "posi-1-2", "posi-1-2-3", "neg-1-2"}
    assert cat.default == "posi-1-2"
    r = cat.get("posi-1-2")
    assert r.token == "BIMCV-COVID19-cIter_1_2"
    assert r.iterations == (1, 2)
    assert r.top_folder == "covid19_posi"
    assert r.iter1_subjects == ("S03044", "S04521")
    assert "covid19_posi_sessions_tsv.tar.gz" in r.metadata_archives
    assert cat.get("posi-1-2-3").checksum_files == ("sha1sum.txt", "sha1sum-b.txt")
    assert cat.get("neg-1-2").top_folder == "covid19_neg"


@pytest.mark.parametrize(
    ("it", "rid", "iter2only"),
    [
        ("1,2", "posi-1-2", False),
        ("1", "posi-1", False),
        ("1,2,3", "posi-1-2-3", False),
        ("2", "posi-1-2", True),
        ("2,1", "posi-1-2", False),
        (None, "posi-1-2", False),
    ],
)
def test_iter_picks_release(it: str | None, rid: str, iter2only: bool) -> None:
    sel = load_catalog().select(iterations=it)
    assert sel.release.id == rid
    assert sel.iteration2_only is iter2only
    if iter2only:
        assert "iteration-2" in sel.describe()


def test_release_by_id_and_errors() -> None:
    cat = load_catalog()
    assert cat.select(release="neg-1-2").release.id == "neg-1-2"
    with pytest.raises(ConfigError, match="unknown release"):
        cat.select(release="nope")
    with pytest.raises(ConfigError):
        cat.select(iterations="3")
    with pytest.raises(ConfigError):
        cat.select(iterations="x")
    with pytest.raises(ConfigError, match="does not hold"):
        cat.select(iterations="3", release="posi-1-2")


def test_subject_archive_pattern() -> None:
    r = load_catalog().get("posi-1-2")
    assert r.is_subject_archive("covid19_posi_subjects_partaa.tar.gz")
    assert r.is_subject_archive("covid19_posi_subjects_partdc.tar.gz")
    # The metadata archive's name contains "subjects" but is not a shard.
    assert not r.is_subject_archive("covid19_posi_subjects.tar.gz")
    assert r.subject_archive_name(0) == "covid19_posi_subjects_partaa.tar.gz"
    assert r.subject_archive_name(27) == "covid19_posi_subjects_partbb.tar.gz"
    p1 = load_catalog().get("posi-1")
    assert p1.is_subject_archive("bimcv_covid19_posi_subjects_34.tgz")
    assert p1.subject_archive_name(6) == "bimcv_covid19_posi_subjects_7.tgz"


def test_iteration_sets_the_id_range_cannot_express_are_refused() -> None:
    cat = load_catalog()
    for it in ("2", "3", "2,3"):
        with pytest.raises(ConfigError, match="cannot be selected"):
            cat.select(iterations=it, release="posi-1-2-3")
    only1 = cat.select(iterations="1", release="posi-1-2-3")
    assert "iteration-1 subjects" in only1.describe()
    with pytest.raises(ConfigError):
        cat.select(iterations="2", release="neg-1-2")  # no ID range known
    assert cat.select(iterations="2", release="posi-1-2").iteration2_only
