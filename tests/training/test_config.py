import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from training.config import ModelConfig, available_configs, load_config
from training.model import build_model

EXPECTED_CONFIGS = {"bert-base", "minilm-l6", "xlm-roberta-base", "gpt2", "t5-small", "tiny-bert"}


def test_named_configs_exist_and_validate():
    assert set(available_configs()) >= EXPECTED_CONFIGS
    for name in available_configs():
        config = load_config(name)
        assert config.encoder.num_layers >= 1


@pytest.mark.parametrize(
    ("name", "millions"),
    [("bert-base", 109.5), ("gpt2", 124.4), ("t5-small", 60.5), ("minilm-l6", 22.6), ("smollm2-135m", 134.5)],
)
def test_reference_configs_have_the_published_sizes(name, millions):
    # Parameter counts of the published models (tied weights counted once).
    assert build_model(load_config(name)).num_parameters() / 1e6 == pytest.approx(millions, abs=0.1)


def test_the_msd_student_is_under_a_third_of_e5_small():
    """The multi-stage distillation student: a 128-wide factorized word table on e5-small's 250,037-token
    vocabulary and 3 layers of weights cycled 4 times, against e5-small's 117,505,920 parameters."""
    student = build_model(load_config("e5-student-e128-3x4"))
    assert student.num_parameters() / 117_505_920 == pytest.approx(0.32, abs=0.01)
    assert len(student.encoder.layers) == 3 and student.config.encoder.num_layers == 12


def test_unknown_component_is_rejected_at_load(tmp_path):
    raw = json.loads(load_config("tiny-bert").to_json())
    raw["encoder"]["activation"] = "swishy"
    with pytest.raises(ValidationError, match="unknown activation 'swishy'"):
        ModelConfig.model_validate(raw)
    raw = json.loads(load_config("tiny-bert").to_json())
    raw["target"]["name"] = "nope"
    with pytest.raises(ValidationError, match="unknown target 'nope'"):
        ModelConfig.model_validate(raw)


def test_reading_a_config_does_not_import_torch():
    code = ("import sys; from training.config import load_config; load_config('t5-small'); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_typo_in_a_field_is_rejected():
    raw = json.loads(load_config("tiny-bert").to_json())
    raw["encoder"]["num_layer"] = 3
    with pytest.raises(ValidationError, match="num_layer"):
        ModelConfig.model_validate(raw)


def test_decoder_needs_target_embedding_and_cross_attention():
    raw = json.loads(load_config("t5-small").to_json())
    raw["target_embedding"] = None
    with pytest.raises(ValidationError, match="decoder and target_embedding go together"):
        ModelConfig.model_validate(raw)
    raw = json.loads(load_config("t5-small").to_json())
    raw["decoder"]["cross_attention"] = False
    with pytest.raises(ValidationError, match="cross_attention"):
        ModelConfig.model_validate(raw)


def test_missing_config_names_the_choices():
    with pytest.raises(FileNotFoundError, match="tiny-bert"):
        load_config("no-such-config")
