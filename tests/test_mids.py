from __future__ import annotations

import pytest

from bimcv_fetch.catalog import load_catalog
from bimcv_fetch.errors import ConfigError
from bimcv_fetch.mids import Role, Selector, parse_path, parse_subset, subject_iteration

TOP = "covid19_posi/sub-S03044/ses-E06138/mod-rx/"


@pytest.mark.parametrize(
    ("name", "modality", "role", "acq", "vp"),
    [
        ("sub-S03044_ses-E06138_run-1_bp-chest_vp-pa_dx.png", "DX", Role.IMAGE, None, "pa"),
        ("sub-S03427_ses-E06828_acq-2_run-1_bp-chest_vp-ll_dx.png", "DX", Role.IMAGE, "2", "ll"),
        ("sub-S04428_ses-E08792_run-1_bp-chest_cr.png", "CR", Role.IMAGE, None, None),
        ("sub-S03531_ses-E07291_acq-29_run-5_bp-chest_ct.nii.gz", "CT", Role.IMAGE, "29", None),
        ("sub-S03531_ses-E07291_acq-29_run-5_bp-chest_ct.json", "CT", Role.SIDECAR, "29", None),
        ("sub-S03044_ses-E06138_run-1_bp-chest_vp-pa_dx.json", "DX", Role.SIDECAR, None, "pa"),
    ],
)
def test_real_names(name: str, modality: str, role: Role, acq: str | None, vp: str | None) -> None:
    f = parse_path(TOP + name)
    assert f.modality == modality
    assert f.role is role
    assert f.entity("acq") == acq
    assert f.entity("vp") == vp
    assert f.subject and f.session
    assert f.entity("bp") == "chest"


def test_sidecar_relation() -> None:
    img = parse_path(TOP + "sub-S03531_ses-E07291_acq-29_run-5_bp-chest_ct.nii.gz")
    assert img.sidecar_path == TOP + "sub-S03531_ses-E07291_acq-29_run-5_bp-chest_ct.json"
    side = parse_path(img.sidecar_path or "")
    assert side.image_stem == TOP + "sub-S03531_ses-E07291_acq-29_run-5_bp-chest_ct"


@pytest.mark.parametrize(
    "path",
    [
        "covid19_posi/participants.tsv",
        "covid19_posi/derivatives/labels/labels_covid_posi.tsv",
        "covid19_posi/sub-S03044/sub-S03044_sessions.tsv",
        "covid19_posi/sub-S03044/ses-E06138/sub-S03044_ses-E06138_scans.tsv",
        "covid19_posi/00_extract_data.sh",
        "covid19_posi/README.md",
    ],
)
def test_non_images_always_selected(path: str) -> None:
    f = parse_path(path)
    assert f.modality is None and f.role is Role.OTHER
    for subset in ("CT", "CR,DX", None):
        assert Selector(subset=parse_subset(subset)).wants(path)


def test_subset_selects_images_and_sidecars() -> None:
    ct = Selector(subset=parse_subset("CT"))
    assert ct.wants(TOP + "sub-S03531_ses-E07291_acq-29_run-5_bp-chest_ct.nii.gz")
    assert ct.wants(TOP + "sub-S03531_ses-E07291_acq-29_run-5_bp-chest_ct.json")
    assert not ct.wants(TOP + "sub-S03044_ses-E06138_run-1_bp-chest_vp-pa_dx.png")
    assert not ct.wants(TOP + "sub-S03044_ses-E06138_run-1_bp-chest_vp-pa_dx.json")
    crdx = Selector(subset=parse_subset("cr, dx"))
    assert crdx.wants(TOP + "sub-S04428_ses-E08792_run-1_bp-chest_cr.png")
    assert not crdx.wants(TOP + "sub-S03531_ses-E07291_acq-29_run-5_bp-chest_ct.nii.gz")
    assert parse_subset(None) is None and parse_subset("all") is None
    with pytest.raises(ConfigError):
        parse_subset("MR")


def test_iterations() -> None:
    rel = load_catalog().get("posi-1-2")
    assert subject_iteration("S03044", rel) == 1
    assert subject_iteration("S04521", rel) == 1
    assert subject_iteration("S04522", rel) == 2
    assert subject_iteration("S00001", rel) == 2
    assert subject_iteration(None, rel) is None
    only2 = Selector(release=rel, iterations=(2,))
    assert not only2.wants("covid19_posi/sub-S03044/sub-S03044_sessions.tsv")
    assert only2.wants("covid19_posi/sub-S05000/sub-S05000_sessions.tsv")
    assert only2.wants("covid19_posi/participants.tsv")
    assert Selector(release=rel, iterations=(1, 2)).is_everything
    assert not only2.is_everything


def test_subjects_filter() -> None:
    sel = Selector(subjects=frozenset({"S03044"}))
    assert sel.wants(TOP + "sub-S03044_ses-E06138_run-1_bp-chest_vp-pa_dx.png")
    assert not sel.wants(
        "covid19_posi/sub-S09999/ses-E1/mod-rx/sub-S09999_ses-E1_run-1_bp-chest_cr.png"
    )


def test_iteration_1_of_a_three_iteration_release() -> None:
    rel = load_catalog().get("posi-1-2-3")
    only1 = Selector(release=rel, iterations=(1,))
    assert only1.wants("covid19_posi/sub-S03044/sub-S03044_sessions.tsv")
    assert not only1.wants("covid19_posi/sub-S09000/sub-S09000_sessions.tsv")
