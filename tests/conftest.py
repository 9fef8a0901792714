import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("HANLM_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with HANLM_SLOW=1 (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A small byte-level BPE tokenizer with the chatml template (built once per session)."""
    from hanlm.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A saved random `test`-preset LLaMA + tokenizer directory (read-only: copy to modify)."""
    from hanlm.testing import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def summary_declared():
    """`check(run_dir, absent=())`: the summary a run wrote holds every key its command declares
    for the report (`Command.summary`), except those its settings do not produce (`absent`)."""
    from hanlm.pipeline.commands import COMMANDS
    from hanlm.runs import read_run
    from hanlm.stage import missing_summary_keys

    def check(run_dir, absent=()):
        info = read_run(run_dir)
        cmd = COMMANDS[info["command"]]
        missing = missing_summary_keys(cmd, info["summary"], tuple(absent))
        assert not missing, f"`hanlm {cmd.name}` declares {missing} but its run did not write them"

    return check


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch):
    """wandb in its offline mode and mlflow on a local file store, both under `tmp_path`."""
    pytest.importorskip("wandb", reason="pip install -e .[dev] installs wandb")
    pytest.importorskip("mlflow", reason="pip install -e .[dev] installs mlflow-skinny")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow-skinny has no database store
    (tmp_path / "wandb-dir").mkdir()
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # wandb reads its settings (WANDB_DIR) once per process, at its set-up
    yield tmp_path
    wandb.teardown()
