"""A Hub token (HF_TOKEN, or the file `hf auth login` writes under HF_HOME) never reaches any file a run or an
export writes, nor their console output."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest

from bamba_ft.errors import BambaFTError
from tests.integration.conftest import cli, run_in_process
from tests.integration.fake_hub import FakeHub, use_hub


def fake_token() -> str:
    return "hf_FAKE" + secrets.token_hex(16)


def files_containing(root: Path, needles: list[str], skip: Path) -> list[str]:
    """Every file under `root` (binary ones too: checkpoints, tensorboard events, safetensors) holding a needle."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and skip not in path.parents:
            data = path.read_bytes()
            found += [f"{path.relative_to(root)}: {n[:10]}..." for n in needles if n.encode() in data]
    return found


def test_hub_token_never_written_or_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture,
                                            recwarn: pytest.WarningsRecorder) -> None:
    env_token, file_token = fake_token(), fake_token()
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    (hf_home / "token").write_text(file_token)  # what `hf auth login` writes
    (hf_home / "stored_tokens").write_text(f"[fake]\nhf_token = {file_token}\n")
    env = {"HF_TOKEN": env_token, "HF_HOME": str(hf_home)}
    # The random part alone as well: a token printed with its prefix cut or masked halfway still counts.
    needles = [env_token, file_token, env_token[7:], file_token[7:]]

    # Training runs in this process, holding the tokens as a CLI run would: in its environment, and where
    # huggingface_hub (which read HF_HOME when it was imported) looks for the saved login. What it prints is read
    # at the file descriptors, what it logs (which the CLI prints and writes to Hydra's .log) through caplog at
    # every level, and its warnings through recwarn; Hydra's own files are the CLI export's below.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(hub_constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(hub_constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    caplog.set_level(logging.DEBUG)
    # Short rows in small batches: what is written and printed does not depend on how much a step computes.
    run_in_process(["trainer=cpu", "trainer.max_steps=2", "eval.num_generate=2", "eval.max_new_tokens=2",
                    "logger=default", "data.builtin_train_examples=64", "data.builtin_val_examples=16",
                    "data.max_seq_len=128", "data.max_tokens_per_batch=512"], tmp_path / "run")
    # Export and push with the token from HF_TOKEN, through the CLI (Hydra's files, the variables read at start):
    # the upload succeeding shows the process held the token.
    with FakeHub(token=env_token) as hub:
        pushed = cli(["recipe=export", "export.checkpoint=run", "export.push_to_hub=true", "export.repo_id=me/t",
                      "hydra.run.dir=export_log"], cwd=tmp_path, env={**env, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"})
        assert hub.repos["me/t"]["commits"]
    # Push with the saved login's token (an empty HF_TOKEN counts as unset), refused: the error message, which the
    # CLI prints whole, is where a token is likeliest to be echoed. In this process, as the training run.
    with FakeHub(token=env_token) as hub, pytest.raises(BambaFTError, match=r"push to me/t failed \(401") as refused:
        use_hub(monkeypatch, hub, "")
        run_in_process(["recipe=export", f"export.checkpoint={tmp_path / 'run'}", f"export.output_dir={tmp_path / 'export2'}",
                        "export.verify=false", "export.push_to_hub=true", "export.repo_id=me/t"], tmp_path / "export2_log")
    here = capfd.readouterr()  # both runs in this process
    printed = [here.out + here.err + caplog.text + "".join(str(w.message) for w in recwarn) + str(refused.value),
               pushed.stdout + pushed.stderr]

    run = tmp_path / "run"
    for name in ("run_config.yaml", "metrics.json", "export/README.md", "export/export_report.json",
                 "export2/export_report.json", "export_log/.hydra/config.yaml", "export_log/.hydra/hydra.yaml"):
        assert (tmp_path / name).exists() or (run / name).exists(), name  # the files the search must cover
    assert list(run.glob("logs/tensorboard/*/events.out.tfevents.*")) and list(run.glob("logs/csv/*/metrics.csv"))
    assert list(tmp_path.rglob("*.log")) and list(run.glob("checkpoints/*.ckpt"))

    assert files_containing(tmp_path, needles, skip=hf_home) == []
    assert [(i, n[:10]) for i, text in enumerate(printed) for n in needles if n in text] == []
