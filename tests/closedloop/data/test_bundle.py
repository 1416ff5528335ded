import h5py
import numpy as np
import pytest

from closedloop.data.bundle import compute_bundle_digest, make_event_codes, read_bundle, write_bundle
from closedloop.data.event_codes import OFFSET, SESSION_END, VALID, is_stimulus_code


@pytest.fixture
def frames():
    return np.random.default_rng(3).integers(0, 256, size=(3, 224, 224, 3), dtype=np.uint8)


def test_round_trip_keeps_frames_ids_codes_and_attrs(tmp_path, frames):
    path = tmp_path / "day_001" / "stimuli.h5"
    digest = write_bundle(path, frames, [7, 8, 9], make_event_codes(3), attrs={"day": 1, "demo": True, "name": "x"})
    bundle = read_bundle(path)
    assert digest == bundle.sha256 == compute_bundle_digest(frames)
    np.testing.assert_array_equal(bundle.pixels, frames)
    assert bundle.stimulus_ids.dtype == np.int64 and bundle.stimulus_ids.tolist() == [7, 8, 9]
    assert bundle.codes.dtype == np.uint16 and bundle.codes.tolist() == [1, 2, 3]
    assert bundle.attrs == {"day": 1, "demo": 1, "name": "x"}
    assert [p.name for p in path.parent.iterdir()] == ["stimuli.h5"]  # no temporary left behind


def test_file_is_matlab_friendly(tmp_path, frames):
    path = tmp_path / "stimuli.h5"
    write_bundle(path, frames, [0, 1, 2], [1, 2, 3], attrs={"flag": False, "rig": "A"})
    with h5py.File(path, "r") as handle:
        pixels = handle["pixels"]
        assert pixels.dtype == np.uint8 and pixels.shape == (3, 224, 224, 3)
        assert pixels.compression == "gzip" and not pixels.shuffle and pixels.fletcher32 is False
        assert handle["codes"].dtype == np.uint16 and handle["stimulus_ids"].dtype == np.int64
        assert handle.attrs["flag"].dtype == np.uint8
        for key in ("sha256", "rig"):
            kind = h5py.h5a.open(handle.id, key.encode()).get_type()
            assert isinstance(kind, h5py.h5t.TypeStringID) and not kind.is_variable_str()
            assert kind.get_cset() == h5py.h5t.CSET_ASCII
        assert handle.id.get_access_plist().get_libver_bounds()[0] == h5py.h5f.LIBVER_EARLIEST


def test_digest_mismatch_names_file_and_both_hashes(tmp_path, frames):
    path = tmp_path / "stimuli.h5"
    digest = write_bundle(path, frames, [0, 1, 2], [1, 2, 3])
    with h5py.File(path, "r+") as handle:
        handle["pixels"][0, 0, 0, 0] = frames[0, 0, 0, 0] ^ 1
    changed = frames.copy()
    changed[0, 0, 0, 0] ^= 1
    with pytest.raises(ValueError, match=rf"stimuli.h5.*sha256 is {compute_bundle_digest(changed)} but the file records {digest}"):
        read_bundle(path)
    assert read_bundle(path, verify=False).sha256 == digest


def test_bad_inputs_are_refused(tmp_path, frames):
    path = tmp_path / "stimuli.h5"
    with pytest.raises(TypeError, match=r"'pixels' must have dtype uint8"):
        write_bundle(path, frames.astype(np.float32), [0, 1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match=r"'pixels' must have shape \(n, 224, 224, 3\)"):
        write_bundle(path, frames[:, :100], [0, 1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match=r"'codes' must be unique"):
        write_bundle(path, frames, [0, 1, 2], [1, 1, 3])
    with pytest.raises(ValueError, match=r"'codes' must lie in \[1, 65279\], but got \[0\]"):
        write_bundle(path, frames, [0, 1, 2], [0, 1, 3])
    with pytest.raises(ValueError, match=r"'codes' must lie in \[1, 65279\], but got \[65280\]"):
        write_bundle(path, frames, [0, 1, 2], [65280, 1, 3])
    with pytest.raises(ValueError, match=r"written by write_bundle itself"):
        write_bundle(path, frames, [0, 1, 2], [1, 2, 3], attrs={"sha256": "x"})
    with pytest.raises(TypeError, match=r"attrs\['bad'\] has type list"):
        write_bundle(path, frames, [0, 1, 2], [1, 2, 3], attrs={"bad": [1]})
    assert not path.exists()
    (tmp_path / "note.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match=r"note.h5': not an HDF5 file"):
        read_bundle(tmp_path / "note.h5")
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        read_bundle(tmp_path / "missing.h5")


def test_event_codes():
    codes = make_event_codes(65279)
    assert codes.dtype == np.uint16 and codes[0] == 1 and codes[-1] == 65279
    assert is_stimulus_code(codes).all() and not is_stimulus_code([0, OFFSET, VALID, SESSION_END]).any()
    assert make_event_codes(0).shape == (0,)
    with pytest.raises(ValueError, match=r"'n' = 65280 stimuli do not fit the 16-bit digital port"):
        make_event_codes(65280)
    with pytest.raises(ValueError, match=r"'n' must lie in \[0, inf\]"):
        make_event_codes(-1)


def test_damaged_bundles_are_refused_in_full_by_read_and_check(tmp_path, frames):
    from closedloop.data.bundle import BundleError, check_bundle

    path = tmp_path / "stimuli.h5"
    write_bundle(path, frames, [7, 8, 9], make_event_codes(3))
    assert check_bundle(path).tolist() == [7, 8, 9]
    cases = {
        "pixels": (lambda h: (h.__delitem__("pixels"), h.create_group("pixels")),
                   "'pixels' must be a dataset, but it is a group"),
        "stimulus_ids": (lambda h: (h.__delitem__("stimulus_ids"), h.create_dataset("stimulus_ids", data=[1, 2, 3, 4])),
                         r"'stimulus_ids' must have shape \(3,\), one per frame of 'pixels', but got \(4,\)"),
        "codes": (lambda h: (h.__delitem__("codes"), h.create_dataset("codes", data=[1.0, 2.0, 3.0])),
                  "'codes' must hold integers, but got dtype float64"),
        "sha256": (lambda h: h.attrs.__setitem__("sha256", np.bytes_("zz")),
                   "the 'sha256' attribute must be 64 lower-case hexadecimal characters"),
    }
    for name, (damage, message) in cases.items():
        damaged = tmp_path / f"{name}.h5"
        damaged.write_bytes(path.read_bytes())
        with h5py.File(damaged, "r+") as handle:
            damage(handle)
        for read in (read_bundle, check_bundle):
            with pytest.raises(BundleError, match=message) as caught:
                read(damaged)
            assert caught.value.problem in str(caught.value) and f"{name}.h5" in str(caught.value)
    with pytest.raises(ValueError, match=r"'stimulus_ids' must be unique \(one frame per stimulus\), but \[7\] repeat"):
        write_bundle(tmp_path / "x.h5", frames, [7, 7, 9], make_event_codes(3))
