import json

from pipeline.config import parse_params
from pipeline.tracking import stage_run, wandb_mode


def _params(tmp_path, mode):
    return parse_params({
        "data": {"sources": [{"name": "x", "kind": "dir", "path": str(tmp_path)}]},
        "tracking": {"wandb_mode": mode, "wandb_dir": str(tmp_path / "wandb"), "reports_dir": str(tmp_path / "reports")},
    })


def test_mode_auto_is_offline_without_key_and_online_with_it(tmp_path, monkeypatch):
    monkeypatch.delenv("OWNLLM_WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode(_params(tmp_path, "auto")) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(_params(tmp_path, "auto")) == "online"
    assert wandb_mode(_params(tmp_path, "disabled")) == "disabled"


def test_offline_run_logs_params_and_writes_metrics_file(tmp_path, monkeypatch):
    monkeypatch.delenv("OWNLLM_WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    params = _params(tmp_path, "auto")
    with stage_run("demo", params) as run:
        run.log({"progress": 1.0}, step=1)
        run.summary({"documents": 3, "by_lang": {"python": 3}})
    metrics = json.loads((tmp_path / "reports" / "demo.json").read_text())
    assert metrics == {"by_lang": {"python": 3}, "documents": 3}
    runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_failed_stage_writes_no_metrics(tmp_path):
    params = _params(tmp_path, "disabled")
    try:
        with stage_run("broken", params) as run:
            run.summary({"documents": 1})
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert not (tmp_path / "reports" / "broken.json").exists()
