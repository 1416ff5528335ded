import tomllib

import pytest

from closedloop.config import (
    CONFIG_NAME,
    ConfigSection,
    ExperimentConfig,
    build_config,
    read_config,
    read_toml_config,
    render_config,
    write_default_config,
    write_preset_config,
)


def _write(folder, text):
    path = folder / CONFIG_NAME
    path.write_text(text)
    return path


def test_defaults_follow_the_paper():
    config = ExperimentConfig()
    assert config.model.layer == "layer4.0"
    assert config.response.window_s == (0.07, 0.17)
    assert config.rsvp.on_s == 0.1 and config.rsvp.off_s == 0.1 and config.rsvp.repetitions == 2
    assert config.attack.steps == 100 and config.attack.step_ratio == pytest.approx(1 / 3)
    assert config.sites.n_sites == 21
    assert config.rig.security == "curve"


@pytest.mark.parametrize("preset", ["paper", "demo"])
def test_init_writes_a_commented_file_that_reads_back(tmp_path, preset):
    path = write_default_config(tmp_path / "exp", preset=preset)
    text = path.read_text()
    assert text.count("\n# ") > 40  # every key is documented
    assert all(len(line) <= 100 for line in text.splitlines())
    config = read_config(path.parent)
    assert config.experiment.name == "exp"
    assert render_config(build_config(tomllib.loads(text))) == text


def test_init_refuses_to_overwrite(tmp_path):
    write_default_config(tmp_path)
    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        write_default_config(tmp_path)
    write_default_config(tmp_path, overwrite=True)


def test_init_applies_changes_over_the_preset_and_names_the_experiment_after_the_folder(tmp_path):
    changes = {"sites": {"n_sites": 5}, "experiment": {"name": "other", "seed": 7}}
    config = read_config(write_default_config(tmp_path / "exp", preset="demo", changes=changes), check_paths=False)
    assert config.sites.n_sites == 5 and config.attack.steps == 20  # change, then preset
    assert config.experiment.name == "exp" and config.experiment.seed == 7
    assert changes == {"sites": {"n_sites": 5}, "experiment": {"name": "other", "seed": 7}}  # left as given


class _Section(ConfigSection):
    """[part]: a test section."""

    size: int = 1
    label: str = "a"


class _Small(ConfigSection):
    part: _Section = _Section()


def test_write_preset_config_serves_any_config_class(tmp_path):
    presets = {"plain": {}, "big": {"part": {"size": 9}}}
    path = write_preset_config(tmp_path / "small.toml", _Small, presets, "big", render=lambda c: repr(c.to_dict()),
                               changes={"part": {"label": "b"}})
    assert path.read_text() == "{'part': {'size': 9, 'label': 'b'}}"
    assert presets == {"plain": {}, "big": {"part": {"size": 9}}}  # the preset is not changed
    with pytest.raises(FileExistsError, match=r"small\.toml already exists; pass --force to overwrite it"):
        write_preset_config(path, _Small, presets, "plain")
    write_preset_config(path, _Small, presets, "plain", render=lambda c: repr(c.to_dict()), overwrite=True)
    assert path.read_text() == "{'part': {'size': 1, 'label': 'a'}}"
    with pytest.raises(ValueError, match=r"'preset': allowed values are 'plain', 'big', but got 'huge'"):
        write_preset_config(tmp_path / "new.toml", _Small, presets, "huge")
    with pytest.raises(ValueError, match=r"preset 'plain': invalid configuration: 'part.size' = 'x'"):
        write_preset_config(tmp_path / "new.toml", _Small, presets, "plain", changes={"part": {"size": "x"}})
    assert not (tmp_path / "new.toml").exists()


def test_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="'preset': allowed values are 'paper', 'demo', but got 'big'"):
        write_default_config(tmp_path, preset="big")


def test_missing_keys_take_defaults(tmp_path):
    _write(tmp_path, "[sites]\nn_sites = 5\n")
    config = read_config(tmp_path)
    assert config.sites.n_sites == 5 and config.attack.steps == 100


@pytest.mark.parametrize(
    "text, message",
    [
        ("[attack]\nsteps = 0\n", r"'attack.steps' = 0: Input should be greater than or equal to 1"),
        ("[attack]\nbudgets = [1.0, -2.0]\n", r"'attack.budgets' = \[1.0, -2.0\]: every budget must be a finite number > 0"),
        ("[attack]\nstep = 3\n", r"unknown key 'attack.step'; allowed keys here are: budgets, paper_scale, steps, step_ratio"),
        ("[atack]\nsteps = 3\n", r"unknown key 'atack'; allowed keys here are: experiment, images, model"),
        ("[fit]\nloss = 'l2'\n", r"'fit.loss' = 'l2': Input should be 'poisson' or 'mse'"),
        ("[attack]\nprecision = 'fp16'\n", r"'attack.precision' = 'fp16': Input should be 'auto', 'fp32' or 'bf16'"),
        ("[attack]\nstep_rule = 'adam'\n", r"'attack.step_rule' = 'adam': Input should be 'pgd' or 'apgd'"),
        ("[sim]\ntruth_step_rule = 'adam'\n", r"'sim.truth_step_rule' = 'adam': Input should be 'pgd' or 'apgd'"),
        ("[attack]\nsteps = 20\nchoose_direction_at = 20\n",
         r"'attack.choose_direction_at' = 20: must lie in \[2, steps - 1\] = \[2, 19\], or be 0"),
        ("[attack]\nchoose_direction_at = 1\n", r"'attack.choose_direction_at' = 1: must lie in \[2, steps - 1\]"),
        ("[sim]\ntruth_steps = 20\ntruth_choose_direction_at = 10\n",
         r"'sim.truth_choose_direction_at' = 10: must lie in \[2, truth_steps // 2 - 1\] = \[2, 9\], or be 0"),
        ("[response]\nwindow_s = [0.17, 0.07]\n", r"'response.window_s' = \[0.17, 0.07\]: need 0 <= start < stop"),
        ("[sites]\nn_sites = 3\ntargets = [0, 5]\n", r"sites \[5\] do not exist; allowed are 0..2"),
        ("[rsvp]\nrepetitions = 'two'\n", r"'rsvp.repetitions' = 'two': Input should be a valid integer"),
        ("[attack\n", r"not valid TOML"),
        ("[nwb]\nsex = 'male'\n", r"'nwb.sex' = 'male': Input should be '', 'M', 'F', 'U' or 'O'"),
        ("[nwb]\nage = '5 years'\n", r"'nwb.age' = '5 years': must be an ISO 8601 duration such as \"P5Y\""),
        ("[nwb]\nsubject_id = 'a/b'\n", r"'nwb.subject_id' = 'a/b': must not contain \"/\""),
        ("[nwb]\nexperimenter = ['Jane Doe']\n", r"each experimenter must be written \"Last, First\"; got \['Jane Doe'\]"),
    ],
)
def test_bad_values_name_key_value_and_allowed(tmp_path, text, message):
    _write(tmp_path, text)
    with pytest.raises(ValueError, match=message):
        read_config(tmp_path)


def test_paths_are_checked_and_resolved(tmp_path):
    _write(tmp_path, "[images]\nsource = 'imagenet/train'\n")
    with pytest.raises(FileNotFoundError, match=r"\[images\] source = 'imagenet/train': no such folder"):
        read_config(tmp_path)
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    assert read_config(tmp_path).images.source == str(tmp_path / "imagenet" / "train")

    _write(tmp_path, "[model]\nbackbone = 'robust.pt'\n")
    with pytest.raises(FileNotFoundError, match="neither a registered name .*resnet50.* nor an existing checkpoint"):
        read_config(tmp_path)
    (tmp_path / "robust.pt").write_bytes(b"")
    assert read_config(tmp_path).model.backbone == str(tmp_path / "robust.pt")

    _write(tmp_path, "[sites]\nsite_map = 'map.csv'\n")
    with pytest.raises(FileNotFoundError, match=r"\[sites\] site_map = 'map.csv': no such file"):
        read_config(tmp_path)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="closedloop init DIR"):
        read_config(tmp_path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[attack]\nsteps = '4'\n", r"'attack.steps' = '4': Input should be a valid integer"),
        ("[attack]\nsteps = true\n", r"'attack.steps' = True: Input should be a valid integer"),
        ("[attack]\nsteps = 4.0\n", r"'attack.steps' = 4.0: Input should be a valid integer"),
        ("[attack]\nbudgets = ['3']\n", r"'attack.budgets.0' = '3': Input should be a valid number"),
        ("[attack]\nbudgets = [true]\n", r"'attack.budgets.0' = True: Input should be a valid number"),
        ("[fit]\nlearning_rate = '0.1'\n", r"'fit.learning_rate' = '0.1': Input should be a valid number"),
        ("[model]\nreadout_positive = 1\n", r"'model.readout_positive' = 1: Input should be a valid boolean"),
        ("[model]\nreadout_positive = 'yes'\n", r"'model.readout_positive' = 'yes': Input should be a valid boolean"),
        ("[sites]\ntargets = ['1']\n", r"'sites.targets.0' = '1': Input should be a valid integer"),
        ("[response]\nwindow_s = ['0.07', 0.1]\n", r"'response.window_s.0' = '0.07': Input should be a valid number"),
    ],
)
def test_numbers_and_booleans_are_not_coerced(tmp_path, text, message):
    _write(tmp_path, text)
    with pytest.raises(ValueError, match=message):
        read_config(tmp_path)


def test_whole_numbers_are_accepted_where_floats_are_expected(tmp_path):
    _write(tmp_path, "[fit]\nlearning_rate = 1\n[attack]\nbudgets = [1, 3]\n[response]\nwindow_s = [0, 1]\n")
    config = read_config(tmp_path)
    assert config.fit.learning_rate == 1.0 and isinstance(config.fit.learning_rate, float)
    assert config.attack.budgets == [1.0, 3.0] and config.response.window_s == (0.0, 1.0)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[fit]\nlearning_rate = inf\n", r"'fit.learning_rate' = inf: Input should be a finite number"),
        ("[model]\nreadout_l1 = inf\n", r"'model.readout_l1' = inf: Input should be a finite number"),
        ("[fit]\nbackbone_learning_rate = nan\n", r"'fit.backbone_learning_rate' = nan: Input should be a finite"),
        ("[rig]\nheartbeat_s = 5.0\ntimeout_s = 5.0\n",
         r"'rig.heartbeat_s' = 5.0: must be shorter than timeout_s \(5.0 s\)"),
        ("[rig]\naddress = 'tcp://127.0.0.1'\n", r"'rig.address' = 'tcp://127.0.0.1': must be a ZeroMQ endpoint"),
        ("[rig]\naddress = 'rig-pc:5555'\n", r"'rig.address' = 'rig-pc:5555': must be a ZeroMQ endpoint"),
        ("[rig]\naddress = 'tcp://rig-pc:99999'\n", r"'rig.address' = 'tcp://rig-pc:99999': must be a ZeroMQ endpoint"),
    ],
)
def test_values_that_would_fail_hours_later_are_refused_on_load(tmp_path, text, message):
    _write(tmp_path, text)
    with pytest.raises(ValueError, match=message):
        read_config(tmp_path)


def test_targets_error_names_the_key_value_and_range_only(tmp_path):
    _write(tmp_path, "[sites]\nn_sites = 3\ntargets = [0, 5]\n")
    with pytest.raises(ValueError) as error:
        read_config(tmp_path)
    message = str(error.value)
    assert message.endswith(
        "invalid configuration: 'sites.targets' = [0, 5]: sites [5] do not exist; allowed are 0..2 (n_sites = 3)"
    )
    assert "{" not in message and "budgets" not in message  # not the whole config, nor the [sites] section


def test_paths_inside_a_folder_are_written_relative_and_resolved_on_read(tmp_path):
    from closedloop.config import make_relative_paths, resolve_paths

    (tmp_path / "exp" / "images" / "a").mkdir(parents=True)
    (tmp_path / "elsewhere.pt").write_bytes(b"")
    (tmp_path / "exp" / "map.csv").write_text("")
    _write(tmp_path / "exp", "[images]\nsource = 'images'\n[model]\nbackbone = '../elsewhere.pt'\n"
                             "[sites]\nsite_map = 'map.csv'\n")
    config = read_config(tmp_path / "exp")
    day = tmp_path / "exp" / "day_000"
    portable = make_relative_paths(config, day, within=tmp_path / "exp")
    assert portable.images.source == "../images" and portable.sites.site_map == "../map.csv"
    assert portable.rig.keys_dir == "../keys"
    assert portable.model.backbone == str(tmp_path / "elsewhere.pt")  # outside the folder: kept absolute
    assert resolve_paths(portable, day) == config


def test_init_writes_the_nwb_section_and_it_reads_back(tmp_path):
    text = write_default_config(tmp_path).read_text()
    assert "\n[nwb]\n" in text and "# The monkey's id" in text and 'species = "Macaca mulatta"' in text
    nwb = read_config(tmp_path).nwb
    assert nwb.find_missing() == ["subject_id", "sex", "age"] and nwb.location == "inferior temporal cortex"
    _write(tmp_path, "[nwb]\nsubject_id = 'monkeyA'\nsex = 'F'\nage = 'P5Y3M'\nexperimenter = ['Doe, Jane']\n")
    assert read_config(tmp_path).nwb.find_missing() == []


@pytest.mark.parametrize(
    "text, message",
    [
        ("species = 'rhesus monkey'", r"'nwb.species' = 'rhesus monkey': must be a Latin binomial such as \"Macaca mulatta\" "
         r"\(genus capitalised, species in lower case\) or an NCBI taxonomy URL such as "
         r"\"http://purl.obolibrary.org/obo/NCBITaxon_9544\""),
        ("species = 'NCBITaxon:9544'", r"write it \"http://purl.obolibrary.org/obo/NCBITaxon_9544\""),
        ("species = 'macaca mulatta'", r"'nwb.species' = 'macaca mulatta': must be a Latin binomial"),
        ("location = ''", r"'nwb.location' = '': must name the brain area of the arrays, e.g. \"inferior temporal cortex\""),
        ("location = '  '", r"'nwb.location' = '  ': must name the brain area"),
        ("age = 'P7Y/P5Y'", r"'nwb.age' = 'P7Y/P5Y': an age range must grow: P7Y is not shorter than P5Y"),
        ("age = 'P12M/P1Y'", r"an age range must grow: P12M is not shorter than P1Y"),
        ("age = '/P5Y'", r"'nwb.age' = '/P5Y': must be an ISO 8601 duration such as \"P5Y\" .* or a range"),
        ("age = 'P5Y/P6Y/P7Y'", r"'nwb.age' = 'P5Y/P6Y/P7Y': must be an ISO 8601 duration"),
        ("date_of_birth = '2019-13-01'", r"'nwb.date_of_birth' = '2019-13-01': must be a date written YYYY-MM-DD, such "
         r"as \"2019-04-01\" \(month must be in 1..12\)"),
        ("date_of_birth = '01/04/2019'", r"'nwb.date_of_birth' = '01/04/2019': must be a date written YYYY-MM-DD"),
        ("date_of_birth = 2019-04-01T10:00:00", r"'nwb.date_of_birth' = 2019-04-01T10:00:00: must be a date written YYYY-MM-DD"),
    ],
)
def test_bad_nwb_values_are_refused_naming_the_key_and_what_dandi_accepts(tmp_path, text, message):
    _write(tmp_path, f"[nwb]\n{text}\n")
    with pytest.raises(ValueError, match=message):
        read_config(tmp_path)


def test_nwb_species_is_checked_exactly_as_dandi_s_inspector_checks_it():
    from nwbinspector.checks import check_subject_species_form
    from pynwb.file import Subject

    from closedloop.config import build_config

    for species in ("Macaca mulatta", "Macaca fascicularis", "Homo sapiens", "M mulatta", "http://purl.obolibrary.org/obo/NCBITaxon_9544",
                    "rhesus monkey", "Rhesus Monkey", "NCBITaxon:9544", "NCBITaxon_9544", "Macaca", "Macaca mulatta mulatta",
                    "Macaca mulatta ", "macaca mulatta", "Macaca Mulatta", "https://purl.obolibrary.org/obo/NCBITaxon_9544",
                    "http://purl.obolibrary.org/obo/NCBITaxon_"):
        inspector = check_subject_species_form(Subject(subject_id="s", species=species)) is None
        try:
            build_config({"nwb": {"species": species}})
            ours = True
        except ValueError:
            ours = False
        assert ours == inspector, species


def test_nwb_age_ranges_and_date_of_birth_are_accepted(tmp_path):
    _write(tmp_path, "[nwb]\nsubject_id = 'monkeyA'\nsex = 'F'\nage = 'P5Y/P7Y'\n")
    assert read_config(tmp_path).nwb.age == "P5Y/P7Y"
    _write(tmp_path, "[nwb]\nage = 'P90Y/'\n")
    assert read_config(tmp_path).nwb.age == "P90Y/"
    _write(tmp_path, "[nwb]\nsubject_id = 'monkeyA'\nsex = 'F'\ndate_of_birth = '2019-04-01'\n")
    nwb = read_config(tmp_path).nwb
    assert nwb.date_of_birth == "2019-04-01" and nwb.find_missing() == []  # DANDI takes a date of birth for an age
    _write(tmp_path, "[nwb]\ndate_of_birth = 2019-04-01\n")  # a TOML date
    assert read_config(tmp_path).nwb.date_of_birth == "2019-04-01"


def test_a_day_config_leaves_the_nwb_section_out():
    from closedloop.config import DAY_INDEPENDENT_SECTIONS, ExperimentConfig, build_config, render_config

    config = build_config({"nwb": {"subject_id": "monkeyA"}})
    assert render_config(config, exclude=DAY_INDEPENDENT_SECTIONS) == render_config(ExperimentConfig(),
                                                                                     exclude=DAY_INDEPENDENT_SECTIONS)
    assert "[nwb]" not in render_config(config, exclude=DAY_INDEPENDENT_SECTIONS)


def test_targets_are_written_in_place_keeping_every_other_line(tmp_path):
    from closedloop.config import write_config_targets

    path = write_default_config(tmp_path / "exp", preset="demo")
    original = read_config(path).to_dict()
    before = path.read_text().splitlines()
    write_config_targets(path.parent, [1, 3], note="chosen on day 0\nsecond line")
    after = path.read_text().splitlines()
    assert read_config(path.parent).sites.targets == [1, 3]
    changed = [line for line in after if line not in before]
    assert changed == ["# targets: chosen on day 0", "# targets: second line", "targets = [1, 3]"]
    assert [line for line in before if line not in after] == ["targets = []"]
    write_config_targets(path, [2], note="again")  # the earlier note is replaced, not piled up
    text = path.read_text()
    assert "# targets: again\ntargets = [2]\n" in text and "chosen on day 0" not in text
    assert read_config(path).to_dict() == original | {"sites": original["sites"] | {"targets": [2]}}


@pytest.mark.parametrize("text, expected", [
    ("[sites]\nn_sites = 8\ntargets = [\n  0,\n  1,\n]\n# kept\n[rig]\nkind = 'sim'\n",
     "[sites]\nn_sites = 8\n# targets: x\ntargets = [5]\n# kept\n[rig]\nkind = 'sim'\n"),
    ("[sites]\nn_sites = 8  # eight\n\n# about [rig]\n[rig]\nkind = 'sim'\n",
     "[sites]\nn_sites = 8  # eight\n# targets: x\ntargets = [5]\n\n# about [rig]\n[rig]\nkind = 'sim'\n"),
    ("[experiment]\nseed = 2", "[experiment]\nseed = 2\n\n[sites]\n# targets: x\ntargets = [5]\n"),
])
def test_targets_land_in_the_sites_table_whatever_its_layout(tmp_path, text, expected):
    from closedloop.config import write_config_targets

    path = _write(tmp_path, text)
    write_config_targets(path, [5], note="x")
    assert path.read_text() == expected


def test_bad_targets_and_unusual_layouts_leave_the_file_alone(tmp_path):
    from closedloop.config import write_config_targets

    path = _write(tmp_path, "[sites]\nn_sites = 4\ntargets = [0]\n")
    with pytest.raises(ValueError, match=r"sites \[4\] do not exist; allowed are 0..3"):
        write_config_targets(path, [4])
    dotted = _write(tmp_path, 'sites.n_sites = 4\n[rig]\nkind = "sim"\n')
    with pytest.raises(ValueError, match=r"cannot set \[sites\] targets in place.*set it by hand: targets = \[1\]"):
        write_config_targets(dotted, [1])
    assert dotted.read_text() == 'sites.n_sites = 4\n[rig]\nkind = "sim"\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME]  # no temporary left behind


def test_a_binary_config_file_is_named_in_one_line(tmp_path):
    path = tmp_path / "rig.toml"
    path.write_bytes(b"\x88\x01 not text")  # e.g. a key file copied over the config
    with pytest.raises(ValueError, match=r"rig.toml: not valid TOML: not UTF-8 text \(byte 0x88 at offset 0\)"):
        read_toml_config(path, "rig.toml", missing="{path}")
