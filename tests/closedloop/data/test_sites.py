import numpy as np
import pytest

from closedloop.data.sites import SiteTable, make_default_sites, read_site_map


def test_default_sites_merge_units_one_per_electrode():
    sites = make_default_sites([1, 96, 97, 192])
    assert sites.n_sites == 4
    assert sites.array.tolist() == [0, 0, 1, 1] and sites.unit.tolist() == [-1] * 4
    assert sites.label == ("e1", "e96", "e97", "e192")
    assert make_default_sites(3) == make_default_sites([1, 2, 3])


def test_membership_merges_units_but_not_noise():
    sites = SiteTable(array=[0, 0], electrode=[1, 2], unit=[-1, 3], label=("a", "b"))
    member = sites.compute_membership(np.array([1, 1, 1, 2, 2]), np.array([0, 5, 255, 3, 4]))
    assert member.tolist() == [[True, False], [True, False], [False, False], [False, True], [False, False]]


def test_read_site_map(tmp_path):
    path = tmp_path / "sites.csv"
    path.write_text("site,array,electrode,unit,label\n0,0,1,-1,A1\n1,1,100,2,B4 unit 2\n")
    sites = read_site_map(path)
    assert sites.electrode.tolist() == [1, 100] and sites.unit.tolist() == [-1, 2]
    assert sites.label == ("A1", "B4 unit 2")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("site,electrode,unit,label\n0,1,-1,a\n", r"the header must be site,array,electrode,unit,label"),
        ("site,array,electrode,unit,label\n", r"has no rows"),
        ("site,array,electrode,unit,label\n1,0,1,-1,a\n", r"must run 0, 1"),
        ("site,array,electrode,unit,label\n0,0,x,-1,a\n", r"must be integers"),
        ("site,array,electrode,unit,label\n0,0,1,-1,a\n1,0,1,-1,b\n", r"\(electrode, unit\) pairs \[\(1, -1\)\]"),
        ("site,array,electrode,unit,label\n0,0,0,-1,a\n", r"'sites.electrode' must lie in \[1, 65535\]"),
    ],
)
def test_bad_site_maps_name_the_file(tmp_path, text, message):
    path = tmp_path / "sites.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_site_map(path)
