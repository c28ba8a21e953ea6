"""One key, ``kind``, chooses what each config section builds; the release's spellings of that choice
(imm.core.release) give the same resolved config wherever a config enters."""

import json

import pytest
import torch
import yaml

import imm
from imm.cli import main
from imm.cli.options import split_network_overrides
from imm.core.config import ConfigError, load_config
from imm.core.release import canonical, canonical_override
from imm.data.datasets import build_dataset
from imm.data.encoders import build_encoder
from imm.evaluation.generate import claim_folder
from imm.evaluation.sampling_run import resolve_sampling_run, sampling_config
from imm.io.checkpoint import read_sampling_settings, save_network
from imm.training.config import load_train_config, resolve_config
from imm.training.loop import train
from tests.helpers import toy_cfg

# (the release's or an older override, the canonical one)
SPELLINGS = [
    ("loss.method=flow_matching", "loss.kind=flow_matching"),
    ("network.model_type=DiT_S_2", "network.kind=DiT_S_2"),
    ("encoder.class_name=training.encoders.StandardRGBEncoder", "encoder.kind=rgb"),
    ("encoder.class_name=imm.data.encoders.StandardRGBEncoder", "encoder.kind=rgb"),
    ("sampling.2_steps.name=restart_generator_fn", "sampling.2_steps.kind=restart"),
    ("dataset.class_name=training.dataset.MNISTDataset", "dataset.kind=mnist"),
    ("resolution=32", "network.img_resolution=32"),
    ("channels=1", "network.img_channels=1"),
    ("label_dim=10", "network.label_dim=10"),
]


def release_spelling(cfg: dict) -> dict:
    """A canonical config written as the release writes its configs (the inverse of canonical, for tests)."""
    cfg = json.loads(json.dumps(cfg))
    net = cfg["network"]
    for top, key in (("resolution", "img_resolution"), ("channels", "img_channels"), ("label_dim", "label_dim")):
        if key in net:
            cfg[top] = net.pop(key)
    net["model_type"] = net.pop("kind")
    net["class_name"] = "training.preconds.IMMPrecond"
    encoders = {"rgb": "StandardRGBEncoder", "sd_vae": "StabilityVAEEncoder", "identity": "IdentityEncoder"}
    cfg["encoder"]["class_name"] = "training.encoders." + encoders[cfg["encoder"].pop("kind")]
    if "kind" in cfg.get("loss", {}):
        cfg["loss"]["method"] = cfg["loss"].pop("kind")
    for entry in cfg.get("sampling", {}).values():
        entry["name"] = entry.pop("kind") + "_generator_fn"
    return cfg


@pytest.mark.parametrize("old, new", SPELLINGS)
def test_each_old_spelling_resolves_as_the_canonical_key(old, new):
    assert load_train_config("mnist", [old]) == load_train_config("mnist", [new])


@pytest.mark.parametrize("preset", ["cifar10", "mnist", "toy2d", "imagenet256", "imagenet256-dit-xl"])
def test_a_preset_written_with_the_release_keys_resolves_the_same(preset, tmp_path):
    cfg = load_config(preset)
    old = release_spelling(cfg)
    assert "kind" not in old["network"] and "kind" not in old["encoder"]
    assert canonical(old) == cfg and canonical(cfg) == cfg  # translating twice changes nothing
    path = tmp_path / "release.yaml"
    path.write_text(yaml.safe_dump(old))
    assert load_config(str(path)) == cfg
    if preset != "imagenet256":  # the one preset without training settings
        assert resolve_config({**old, "dataset": {"kind": "mnist"}}) == resolve_config({**cfg, "dataset": {"kind": "mnist"}})


def test_the_release_spelling_of_imagenet256_is_the_canonical_one_of_its_training_presets():
    """imagenet256.yaml keeps the release's keys; the presets extending it are written canonically."""
    text = (imm.__path__[0] + "/presets/imagenet256.yaml")
    assert "class_name: training.encoders.StabilityVAEEncoder" in open(text).read()
    cfg = load_config("imagenet256-dit-b")
    assert (cfg["encoder"]["kind"], cfg["network"]["kind"], cfg["network"]["img_channels"]) == ("sd_vae", "DiT_B_2", 4)
    assert {e["kind"] for e in cfg["sampling"].values()} == {"pushforward"}


def test_a_choice_given_both_ways_is_one_error_naming_both_keys(tmp_path, capsys):
    for section, message in [
        ({"loss": {"method": "imm", "kind": "flow_matching"}}, "loss.method 'imm' and loss.kind 'flow_matching' disagree"),
        ({"network": {"model_type": "DiT", "kind": "MLP"}}, "network.model_type 'DiT' and network.kind 'MLP' disagree"),
        ({"encoder": {"class_name": "StandardRGBEncoder", "kind": "identity"}}, "encoder.class_name 'StandardRGBEncoder' "
                                                                                "and encoder.kind 'identity' disagree"),
        ({"sampling": {"a": {"name": "restart_generator_fn", "kind": "pushforward"}}},
         "sampling.a.name 'restart_generator_fn' and sampling.a.kind 'pushforward' disagree"),
        ({"resolution": 32, "network": {"img_resolution": 64}}, "resolution 32 and network.img_resolution 64 disagree"),
    ]:
        with pytest.raises(ConfigError, match=message) as e:
            canonical(section)
        assert "\n" not in str(e.value)
    # the same value both ways is no conflict
    assert canonical({"loss": {"method": "imm", "kind": "imm"}}) == {"loss": {"kind": "imm"}}
    path = tmp_path / "both.yaml"
    path.write_text("base: toy2d\nloss:\n  method: consistency\n  kind: flow_matching\n")
    assert main(["train", "--config", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss.method 'consistency' and loss.kind 'flow_matching' disagree" in err[0]


def test_an_unknown_kind_names_the_nearest_one():
    for override, nearest in [("loss.kind=flow_match", "flow_matching"), ("loss.method=consistancy", "consistency"),
                              ("network.kind=DiT_XL2", "DiT_XL_2"), ("network.model_type=SongUnet", "SongUNet"),
                              ("sampling.1_step.kind=pushfoward", "pushforward")]:
        key = override.split("=")[0].replace("method", "kind").replace("model_type", "kind")
        with pytest.raises(ConfigError, match=rf"unknown {key} '.*'; did you mean '{nearest}'"):
            load_train_config("mnist", [override])
    with pytest.raises(ConfigError, match="unknown dataset.kind 'mnsit'; did you mean 'mnist'"):
        build_dataset({"kind": "mnsit"})
    with pytest.raises(ConfigError, match="unknown encoder.kind 'sd-vae'; did you mean 'sd_vae'"):
        build_encoder({"kind": "sd-vae"})
    with pytest.raises(ConfigError, match="unknown encoder.class_name 'training.encoders.StabilityVAE'; did you mean "
                                          "'StabilityVAEEncoder'"):
        load_train_config("mnist", ["encoder.class_name=training.encoders.StabilityVAE"])


def test_overrides_land_on_the_canonical_key():
    assert canonical_override("encoder.class_name", "training.encoders.StabilityVAEEncoder") == ("encoder.kind", "sd_vae")
    assert canonical_override("sampling.x.name", "pushforward_generator_fn") == ("sampling.x.kind", "pushforward")
    assert canonical_override("network.class_name", "training.preconds.IMMPrecond") is None  # checked, nothing to set
    assert canonical_override("eval.seed", 3) == ("eval.seed", 3)
    rest, network = split_network_overrides(["network.model_type=DiT", "network.class_name=IMMPrecond",
                                             "resolution=8", "eval.seed=2", "sampling.1_step.name=restart_generator_fn"])
    assert network == {"kind": "DiT", "img_resolution": 8}
    assert rest == ["eval.seed=2", "sampling.1_step.name=restart_generator_fn"]
    cfg, _ = sampling_config("cifar10", None, rest)
    assert cfg["sampling"]["1_step"] == {"kind": "restart", "mid_nt": None} and cfg["eval"]["seed"] == 2


def test_an_old_run_whose_checkpoint_says_loss_method_resumes_without_a_change(tmp_path, capsys):
    """A training state whose stored config has the release's keys (loss.method, encoder.class_name,
    network.model_type, top-level resolution/channels, sampling.*.name) resumes under today's keys with no
    reported change, and its network file with such settings samples with them."""
    run = tmp_path / "run"
    train(toy_cfg("training.total_steps=2", "logging.checkpoint_every=1", "loss.kind=flow_matching"), run, device="cpu")
    [state_path] = sorted((run / "checkpoints").glob("training-state-*.pt"))[-1:]
    state = torch.load(state_path, weights_only=False)
    state["config"] = release_spelling(state["config"])
    assert state["config"]["loss"]["method"] == "flow_matching" and "resolution" in state["config"]
    torch.save(state, state_path)
    assert read_sampling_settings(state_path)["loss"] == {"kind": "flow_matching"}
    capsys.readouterr()
    train(toy_cfg("training.total_steps=3", "logging.checkpoint_every=1", "loss.kind=flow_matching"), run, device="cpu")
    changes = [line for line in capsys.readouterr().out.splitlines() if "changed settings" in line]
    assert changes == ["imm train: resuming with changed settings: training.total_steps 2 -> 3"]  # the one change
    assert torch.load(sorted((run / "checkpoints").glob("training-state-*.pt"))[-1], weights_only=False)["step"] == 3

    # a network file that records its sampling settings with the release's keys
    old_settings = release_spelling({**read_sampling_settings(run / "network.safetensors"), "network": {"kind": "MLP"}})
    del old_settings["network"]
    path = tmp_path / "old.safetensors"
    save_network(imm.load_network(run / "network.safetensors"), path, old_settings)
    assert json.dumps(old_settings).count("generator_fn") == 3
    cfg, _ = sampling_config(None, path, [])
    assert cfg["loss"] == {"kind": "flow_matching"} and cfg["encoder"]["kind"] == "identity"
    resolved = resolve_sampling_run(cfg, path, torch.device("cpu"))
    assert resolved.method == "flow_matching" and list(resolved.entries) == ["1_step", "2_steps", "4_steps"]


def test_an_image_folder_recorded_with_the_release_encoder_key_is_the_same_settings(tmp_path):
    folder = tmp_path / "1_step"
    folder.mkdir()
    settings = {"seed": 0, "encoder": {"kind": "rgb"}}
    (tmp_path / "1_step.settings.json").write_text(json.dumps({"seed": 0, "encoder": {"class_name": "StandardRGBEncoder"}}))
    claim_folder(folder, settings)
    with pytest.raises(ConfigError, match="encoder.kind: 'rgb' there, 'identity' now"):
        claim_folder(folder, {"seed": 0, "encoder": {"kind": "identity"}})


def test_the_settings_of_a_run_config_written_with_the_release_keys_name_its_method():
    """RUN/config.yaml of a run written with loss.method: the settings imm ema reconstruct records say loss.kind."""
    from imm.io.checkpoint import sampling_settings

    settings = sampling_settings({"loss": {"method": "flow_matching"}, "encoder": {"class_name": "StandardRGBEncoder"},
                                  "sampling": {"1_step": {"name": "pushforward_generator_fn"}}})
    assert settings["loss"] == {"kind": "flow_matching"}
    assert settings["encoder"]["kind"] == "rgb" and settings["sampling"]["1_step"] == {"kind": "pushforward"}
