"""Recipe validation: good recipes pass, bad ones fail naming file, line and key."""

import json

import pytest

from safecl.cli import main
from safecl.errors import RecipeError
from safecl.recipe import load_recipe
from tests.conftest import SMOKE

GOOD = """\
version: 1
seed: 3
output_dir: runs/x
model: {name: builtin:tiny-llama}
adapter:
  method: lori-s
  rank: 4
train:
  lr: 1e-4
stages:
  - name: safety
    kind: safety
    data: {source: DATA}
  - name: math
    kind: task
    epochs: 2
    data: {source: DATA}
"""


def write(tmp_path, text, data):
    p = tmp_path / "recipe.yaml"
    p.write_text(text.replace("DATA", str(data)))
    return p


def test_good_recipe_resolves_defaults_and_stage_overrides(tmp_path, arithmetic_file):
    r = load_recipe(write(tmp_path, GOOD, arithmetic_file))
    assert r.seed == 3 and r.adapter.rank == 4 and r.train.lr == pytest.approx(1e-4)
    assert r.stage_settings(1).epochs == 2 and r.stage_settings(0).epochs == 1
    assert r.adapter.target_modules[0] == "q_proj"  # default filled in


def test_shipped_recipes_validate():
    for path in sorted(SMOKE.parent.glob("*.yaml")):
        load_recipe(path)


def test_unknown_key_names_line_and_suggests(tmp_path, arithmetic_file):
    text = GOOD.replace("  rank: 4", "  rank: 4\n  rnak: 8")
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, text, arithmetic_file))
    msg = str(err.value)
    assert "recipe.yaml:8" in msg and "adapter.rnak" in msg and "did you mean 'adapter.rank'" in msg


def test_unknown_key_inside_stage_list(tmp_path, arithmetic_file):
    text = GOOD.replace("    epochs: 2", "    epoch: 2")
    with pytest.raises(RecipeError, match=r"recipe.yaml:16: unknown key 'stages.1.epoch'; did you mean 'stages.1.epochs'"):
        load_recipe(write(tmp_path, text, arithmetic_file))


def test_wrong_type_names_key_path_and_line(tmp_path, arithmetic_file):
    text = GOOD.replace("  rank: 4", "  rank: four")
    with pytest.raises(RecipeError, match=r"recipe.yaml:7: adapter.rank: .*integer.*'four'"):
        load_recipe(write(tmp_path, text, arithmetic_file))


def test_a_boolean_where_a_number_belongs_is_refused(tmp_path, arithmetic_file):
    """YAML reads `true` as a boolean and pydantic would take it as 1 (lr 1.0): an error naming the key."""
    with pytest.raises(RecipeError, match=r"recipe.yaml:9: train.lr: .*expected a number, got a boolean \(true\)"):
        load_recipe(write(tmp_path, GOOD.replace("lr: 1e-4", "lr: true"), arithmetic_file))
    recipe = write(tmp_path, GOOD, arithmetic_file)
    for override in ("train.lr=true", "adapter.rank=false", "stages.1.epochs=true", "gate.min_retention=true"):
        with pytest.raises(RecipeError, match=rf"command-line override {override}\): {override.split('=')[0]}: "
                                              r".*expected a number, got a boolean"):
            load_recipe(recipe, [override])
    assert load_recipe(recipe, ["retention.enabled=false"]).retention.enabled is False  # a boolean field still is one


def test_negative_size_is_an_error(tmp_path, arithmetic_file):
    with pytest.raises(RecipeError, match=r"stages.1.epochs: Input should be greater than 0"):
        load_recipe(write(tmp_path, GOOD.replace("epochs: 2", "epochs: -1"), arithmetic_file))


def test_missing_data_file_names_key_and_line(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, GOOD, tmp_path / "nope.jsonl"))
    assert "recipe.yaml:13: stages.0.data.source: file not found" in str(err.value)
    assert "nope.jsonl" in str(err.value)


def test_unknown_builtin_set(tmp_path):
    with pytest.raises(RecipeError, match="unknown built-in set 'builtin:nope'"):
        load_recipe(write(tmp_path, GOOD, "builtin:nope"))


def test_first_stage_must_be_safety_and_names_unique(tmp_path, arithmetic_file):
    with pytest.raises(RecipeError, match="stages.0 must be the safety stage"):
        load_recipe(write(tmp_path, GOOD.replace("kind: safety", "kind: task"), arithmetic_file))
    with pytest.raises(RecipeError, match="unique"):
        load_recipe(write(tmp_path, GOOD.replace("name: math", "name: safety"), arithmetic_file))


def test_densities_over_capacity_fail_at_validate(tmp_path, arithmetic_file):
    p = write(tmp_path, GOOD, arithmetic_file)
    with pytest.raises(RecipeError, match=r"densities add up to 1.200 > 1"):
        load_recipe(p, ["adapter.density=0.6"])
    load_recipe(p, ["adapter.density=0.6", "adapter.disjoint=false"])  # overlapping masks may exceed


def test_overrides(tmp_path, arithmetic_file):
    p = write(tmp_path, GOOD, arithmetic_file)
    r = load_recipe(p, ["train.lr=3e-4", "stages.1.epochs=5", "adapter.target_modules=[q_proj, v_proj]"])
    assert r.train.lr == pytest.approx(3e-4) and r.stage_settings(1).epochs == 5
    assert r.adapter.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(RecipeError, match="index 7 out of range"):
        load_recipe(p, ["stages.7=1"])
    with pytest.raises(RecipeError, match=r"command-line override train.lrr=1.*did you mean 'train.lr'"):
        load_recipe(p, ["train.lrr=1"])
    with pytest.raises(RecipeError, match="not KEY=VALUE"):
        load_recipe(p, ["train.lr"])


def test_newer_version_is_refused(tmp_path, arithmetic_file):
    with pytest.raises(RecipeError, match="version 9 is newer"):
        load_recipe(write(tmp_path, GOOD.replace("version: 1", "version: 9"), arithmetic_file))


def test_yaml_is_data_only(tmp_path, arithmetic_file):
    text = GOOD.replace("seed: 3", "seed: !!python/object/apply:os.system ['echo pwned']")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, text, arithmetic_file))


def test_cli_validate_schema_and_dry_run(tmp_path, arithmetic_file, capsys):
    p = write(tmp_path, GOOD, arithmetic_file)
    assert main(["validate", str(p)]) == 0
    assert main(["validate", str(p), "adapter.rank=0"]) == 2
    assert "adapter.rank" in capsys.readouterr().err
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "stages" in schema["properties"] and schema["additionalProperties"] is False
    assert main(["train", str(p), "--dry-run", "stages.1.max_steps=7"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "steps=7" in out and "steps=5" in out  # 40 examples / batch 8 = 5
