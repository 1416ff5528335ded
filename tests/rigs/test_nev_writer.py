import numpy as np
import pytest
from neo.rawio import BlackrockRawIO

from closedloop.data.recording import Recording
from rigs.nev import SPIKE_WIDTH, write_nev, write_nsx


@pytest.fixture
def recording():
    return Recording.from_ticks(
        spike_ticks=[4000, 3000, 3500], spike_electrodes=[2, 1, 2], spike_units=[0, 1, 3],
        event_ticks=[2900, 3200], event_words=[41, 0], electrodes=(1, 2, 5),
    )


@pytest.mark.parametrize(("version", "magic", "prefix"), [("2.2", b"NEURALEV", 8), ("2.3", b"NEURALEV", 8),
                                                          ("3.0", b"BREVENTS", 12)])
def test_layout_follows_the_published_spec(tmp_path, recording, version, magic, prefix):
    path = write_nev(tmp_path / "rec.nev", recording, version=version)
    data = path.read_bytes()
    header = np.frombuffer(data[:28], dtype=[("magic", "S8"), ("major", "u1"), ("minor", "u1"), ("flags", "<u2"),
                                             ("header_bytes", "<u4"), ("packet_bytes", "<u4"), ("clock", "<u4"),
                                             ("sampling", "<u4")])[0]
    packet_bytes = prefix + 2 * SPIKE_WIDTH
    assert header["magic"] == magic and f"{header['major']}.{header['minor']}" == version
    assert header["flags"] & 1 and header["clock"] == 30000 and header["packet_bytes"] == packet_bytes
    assert header["header_bytes"] == 336 + 32 * 2 * 3 == len(data) - 5 * packet_bytes
    assert int.from_bytes(data[332:336], "little") == 6  # extended headers
    assert data[336:344] == b"NEUEVWAV" and int.from_bytes(data[344:346], "little") == 1
    assert data[336 + 3 * 32 : 344 + 3 * 32] == b"NEUEVLBL"
    stamp = "<u8" if version == "3.0" else "<u4"
    packets = np.frombuffer(data[header["header_bytes"]:], dtype=np.dtype({
        "names": ["t", "id", "reason", "word"], "formats": [stamp, "<u2", "u1", "<u2"],
        "offsets": [0, prefix - 4, prefix - 2, prefix], "itemsize": packet_bytes}))
    assert packets["t"].tolist() == [2900, 3000, 3200, 3500, 4000]
    assert packets["id"].tolist() == [0, 1, 0, 2, 2]
    assert packets["reason"].tolist()[::2] == [1, 1, 0] and packets["word"][[0, 2]].tolist() == [41, 0]


@pytest.mark.parametrize("version", ["2.2", "2.3", "3.0"])
@pytest.mark.parametrize("with_ns2", [False, True])
def test_neo_reads_what_we_write(tmp_path, recording, version, with_ns2):
    path = write_nev(tmp_path / "rec.nev", recording, version=version, write_ns2=with_ns2)
    assert (tmp_path / "rec.ns2").exists() == with_ns2
    reader = BlackrockRawIO(filename=str(path))
    reader.parse_header()
    assert reader.header["nb_segment"] == [1]
    assert reader.header["spike_channels"]["name"].tolist() == ["ch1#1", "ch2#0", "ch2#3"]
    assert reader.get_spike_timestamps(0, 0, 2, None, None).tolist() == [3500]
    waveforms = reader.get_spike_raw_waveforms(0, 0, 0, None, None)
    assert waveforms.shape == (1, 1, SPIKE_WIDTH) and waveforms.min() < -200
    names = reader.header["event_channels"]["name"].tolist()
    times, _, labels = reader.get_event_timestamps(0, 0, names.index("digital_input_port"), None, None)
    assert times.tolist() == [2900, 3200] and labels.tolist() == ["41", "0"]
    if with_ns2:
        assert reader.header["signal_channels"]["id"].tolist() == ["1", "2", "5"]
        assert reader.get_signal_size(0, 0, 0) >= 4000 // 30


def test_writer_refuses_what_the_format_cannot_hold(tmp_path, recording):
    with pytest.raises(ValueError, match=r"Invalid value for 'version': allowed values are '2.2', '2.3', '3.0'"):
        write_nev(tmp_path / "a.nev", recording, version="2.1")
    with pytest.raises(ValueError, match=r"must end in .nev"):
        write_nev(tmp_path / "a.dat", recording)
    wide = Recording.from_ticks([1], [300], [0], [], [], (300,))
    with pytest.raises(ValueError, match=r"electrodes \[300\] do not fit NEV 2.2.*write version 2.3"):
        write_nev(tmp_path / "a.nev", wide, version="2.2")
    long = Recording.from_ticks([2**32], [1], [0], [], [], (1,))
    with pytest.raises(ValueError, match=r"beyond the 32-bit clock of NEV 2.3"):
        write_nev(tmp_path / "a.nev", long, version="2.3")
    assert write_nev(tmp_path / "a.nev", long, version="3.0").exists()
    with pytest.raises(TypeError, match=r"'recording' must be a closedloop Recording"):
        write_nev(tmp_path / "b.nev", {"spikes": []})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nev"]


@pytest.mark.parametrize(("version", "magic"), [("2.2", b"NEURALCD"), ("2.3", b"NEURALCD"), ("3.0", b"BRSMPGRP")])
def test_neo_reads_the_continuous_signals_we_write(tmp_path, version, magic):
    signals = np.array([[-32764, 0], [0, 100], [32764, -7], [5, 5]], dtype=np.int16)
    path = write_nsx(tmp_path / "rec.ns5", signals, [129, 7], labels=["ainp1", "elec7"], period=1, first_tick=900,
                     units="mV", analog_max=5000, version=version)
    assert path.read_bytes()[:8] == magic and path.stat().st_size == 314 + 2 * 66 + (13 if version == "3.0" else 9) + 16
    reader = BlackrockRawIO(filename=str(path), nsx_to_load=5, load_nev=False)
    reader.parse_header()
    channels = reader.header["signal_channels"]
    assert channels["name"].tolist() == ["ainp1", "elec7"] and channels["id"].tolist() == ["129", "7"]
    assert channels["units"].tolist() == ["mV", "mV"] and reader.get_signal_sampling_rate(0) == 30000.0
    assert reader.get_signal_t_start(0, 0, 0) == pytest.approx(900 / 30000)
    np.testing.assert_array_equal(reader.get_analogsignal_chunk(0, 0, 0, 4, 0), signals)
    scaled = reader.rescale_signal_raw_to_float(reader.get_analogsignal_chunk(0, 0, 0, 4, 0), dtype="float64")
    assert scaled[[0, 2], 0].tolist() == pytest.approx([-5000.0, 5000.0])
    with pytest.raises(ValueError, match=r"'signals' must be int16 \(n_samples, 2\)"):
        write_nsx(tmp_path / "bad.ns5", signals.astype(np.float32), [129, 7])
    with pytest.raises(ValueError, match=r"must end in .ns1 to .ns6"):
        write_nsx(tmp_path / "bad.nev", signals, [129, 7])
