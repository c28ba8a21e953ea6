"""YAML presets and dotted overrides."""

import pytest

from imm.config import ConfigError, apply_overrides, load_config, preset_names


def test_presets_load():
    assert {"cifar10", "imagenet256"} <= set(preset_names())
    cfg = load_config("cifar10")
    assert cfg["sampling"]["2_steps"]["mid_nt"] == [1.4]
    im = load_config("imagenet256")
    assert [e["num_steps"] for e in im["sampling"].values()] == [1, 2, 4, 8]
    assert all(e["cfg_scale"] == 1.5 for e in im["sampling"].values())


def test_overrides_release_spelling():
    cfg = load_config("imagenet256")
    out = apply_overrides(cfg, ["eval.batch_size=4", "network.temb_type=identity", "+extra.key=[1, 2]",
                                "encoder.vae_name=/tmp/vae", "eval.seed=null", "+lr=3e-4", "+name=abc"])
    assert out["lr"] == 3e-4 and out["name"] == "abc"
    assert out["eval"]["batch_size"] == 4 and out["eval"]["seed"] is None
    assert out["network"]["temb_type"] == "identity"
    assert out["extra"]["key"] == [1, 2]
    assert out["encoder"]["vae_name"] == "/tmp/vae"
    assert cfg["eval"]["batch_size"] == 16  # the input is not modified


def test_unknown_key_names_the_nearest():
    cfg = load_config("cifar10")
    with pytest.raises(ConfigError, match="did you mean 'eval.batch_size'"):
        apply_overrides(cfg, ["eval.batchsize=3"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(cfg, ["eval.batch_size"])


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown config 'cifar11'"):
        load_config("cifar11")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(scalar))


@pytest.mark.parametrize("model_type, typo, nearest", [
    ("SongUNet", "model_chanels", "model_channels"), ("DiT", "hiden_size", "hidden_size"),
    ("DiT_S_2", "num_head", "num_heads"), ("MLP", "hiden", "hidden")])
def test_a_network_key_typo_is_refused_for_every_backbone(model_type, typo, nearest, capsys):
    """Issue 12: the release's backbones ignore unknown keys (SongUNet warned), so a typo trained another
    model; now it is one error naming the nearest key, from Python and from `imm train`."""
    import imm

    with pytest.raises(ValueError, match=rf"unknown network key '{typo}' .*did you mean 'network\.{nearest}'"):
        imm.IMMNetwork(img_resolution=8, img_channels=4, model_type=model_type, **{typo: 1})
    if model_type == "MLP":
        from imm import cli

        assert cli.main(["train", "--config", "toy2d", "--run-dir", "unused", f"network.{typo}=64"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"did you mean 'network.{nearest}'" in err[0]
